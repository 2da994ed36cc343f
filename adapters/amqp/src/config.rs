//! `[amqp]`: RabbitMQ (AMQP 0-9-1). Optional; absent means no AMQP.
//!
//! ```toml
//! [amqp]
//! url = "amqp://tributary:secret@rabbit:5672/%2f"   # amqps:// for TLS
//!
//! [amqp.sink]                     # publish every outbox event (absent = off)
//! exchange = "tributary.events"
//! payload = "full-resource"       # or "id-only"
//!
//! [amqp.source]                   # ingest messages from a queue (absent = off)
//! queue = "tributary.ingest"
//! protocol = "hl7v2"              # or "fhir"
//! partner = "rabbit-feed"
//! prefetch = 64
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("invalid value for `amqp.{key}`: {value:?} — {allowed}")]
pub struct AmqpConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

fn invalid(key: &str, value: impl ToString, allowed: &str) -> AmqpConfigError {
    AmqpConfigError {
        key: key.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://user:password@host:port/vhost` (`%2f` is the default vhost `/`);
    /// `amqps://` for TLS. The password is never logged; prefer `TRIBUTARY_AMQP__URL`.
    pub url: String,
    /// First reconnect delay; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub sink: Option<AmqpSinkConfig>,
    pub source: Option<AmqpSourceConfig>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            retry_initial_ms: 500,
            retry_max_ms: 30_000,
            sink: None,
            source: None,
        }
    }
}

/// What a published message's body carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AmqpPayload {
    /// The FHIR resource JSON (`application/fhir+json`); deletes and message-level events
    /// carry the id-only notification.
    FullResource,
    /// A JSON notification: event id, type, resource type/id/version, patient id.
    IdOnly,
}

/// Publishes every outbox event to a topic exchange with routing key
/// `<tenant>.<ResourceType>.<create|update|delete>` (message events: `<tenant>.hl7v2.adt.A01`),
/// persistent, with publisher confirms: the outbox cursor advances only on the broker's ack.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSinkConfig {
    pub exchange: String,
    /// Declare the exchange (durable, type `topic`) at start.
    pub declare_exchange: bool,
    pub payload: AmqpPayload,
    /// Outbox cursor name; a second sink with another name gets every event too.
    pub cursor_name: String,
    /// Most messages published but not yet confirmed.
    pub max_in_flight: usize,
}

impl Default for AmqpSinkConfig {
    fn default() -> Self {
        Self {
            exchange: "tributary.events".into(),
            declare_exchange: true,
            payload: AmqpPayload::FullResource,
            cursor_name: "amqp".into(),
            max_in_flight: 1_000,
        }
    }
}

/// Which parser and mapping family the queue's messages go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceProtocol {
    Hl7v2,
    Fhir,
    /// By the message's `content-type`: `application/fhir+json` → FHIR, else HL7 v2.
    Auto,
}

/// Consumes HL7 v2 or FHIR messages from a queue. Each message is written to the journal
/// (durably) before it is acknowledged to the broker, so a crash redelivers it instead of
/// losing it; redeliveries are recognised by partner + control id (HL7 MSH-10, or the AMQP
/// `message-id`) and not stored twice.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSourceConfig {
    pub queue: String,
    /// Declare the queue (durable) at start.
    pub declare_queue: bool,
    pub protocol: SourceProtocol,
    /// The configured partner these messages come from (audit, ordering, de-duplication).
    pub partner: String,
    /// Tenant the messages belong to; empty = the default tenant.
    pub tenant: String,
    /// Unacknowledged deliveries the broker may push at once (bounded memory, backpressure).
    pub prefetch: u16,
    /// Larger messages are rejected (not requeued; a dead-letter exchange on the queue keeps
    /// them).
    pub max_message_bytes: usize,
}

impl Default for AmqpSourceConfig {
    fn default() -> Self {
        Self {
            queue: "tributary.ingest".into(),
            declare_queue: true,
            protocol: SourceProtocol::Hl7v2,
            partner: "amqp".into(),
            tenant: String::new(),
            prefetch: 64,
            max_message_bytes: 10 << 20,
        }
    }
}

fn check_name(key: &str, v: &str) -> Result<(), AmqpConfigError> {
    if v.is_empty()
        || v.len() > 255
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
    {
        return Err(invalid(
            key,
            v,
            "1-255 characters: letters, digits, '.', '_', '-', ':'",
        ));
    }
    Ok(())
}

impl AmqpConfig {
    /// Checks every value without network access.
    pub fn validate(&self) -> Result<(), AmqpConfigError> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(invalid(
                "url",
                redact(&self.url),
                "amqp://user:password@host:port/vhost or amqps://…",
            ));
        }
        if self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return Err(invalid(
                "retry_initial_ms",
                self.retry_initial_ms,
                "greater than 0 and not above retry_max_ms",
            ));
        }
        if let Some(s) = &self.sink {
            check_name("sink.exchange", &s.exchange)?;
            if s.cursor_name.is_empty() {
                return Err(invalid("sink.cursor_name", "", "a non-empty name"));
            }
            if s.max_in_flight == 0 {
                return Err(invalid("sink.max_in_flight", 0, "at least 1"));
            }
        }
        if let Some(s) = &self.source {
            check_name("source.queue", &s.queue)?;
            if s.partner.is_empty() {
                return Err(invalid("source.partner", "", "a configured partner id"));
            }
            if s.prefetch == 0 {
                return Err(invalid(
                    "source.prefetch",
                    0,
                    "1-65535 (0 would mean unbounded)",
                ));
            }
            if s.max_message_bytes == 0 {
                return Err(invalid("source.max_message_bytes", 0, "at least 1"));
            }
        }
        Ok(())
    }
}

/// The URL without its password, for logs and `/ready`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***@{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AmqpConfig, String> {
        let c: AmqpConfig = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_and_sections() {
        let c = parse("").unwrap();
        assert!(c.sink.is_none() && c.source.is_none());
        let c = parse("[sink]\n[source]\nprotocol = \"fhir\"").unwrap();
        assert_eq!(c.sink.unwrap().exchange, "tributary.events");
        assert_eq!(c.source.unwrap().protocol, SourceProtocol::Fhir);
    }

    #[test]
    fn errors_name_key_and_never_the_password() {
        let e = parse("url = \"http://u:secret@h/\"").unwrap_err();
        assert!(e.contains("amqp.url") && !e.contains("secret"), "{e}");
        let e = parse("[source]\nprefetch = 0").unwrap_err();
        assert!(e.contains("amqp.source.prefetch"), "{e}");
        let e = parse("[sink]\nexchange = \"a b\"").unwrap_err();
        assert!(e.contains("amqp.sink.exchange"), "{e}");
        let e = parse("[sink]\nexchnage = \"x\"").unwrap_err();
        assert!(e.contains("exchnage"), "{e}");
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://***@127.0.0.1:5672/%2f"
        );
    }
}
