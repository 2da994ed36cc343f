//! `[kafka]`: the outbox → Kafka relay. The section is optional; absent means no Kafka.
//!
//! ```toml
//! [kafka]
//! brokers = "kafka-1:9092,kafka-2:9092"
//! # Topic names: `{resource_type}` / `{event_type}` are filled per event; an empty template
//! # turns that family of topics off.
//! resource_topic = "fhir.r4.{resource_type}"
//! source_event_topic = "{event_type}"
//! topic_prefix = ""                       # `{tenant}` allowed, e.g. "{tenant}."
//! tenant_prefixes = { acme = "acme-prod." } # overrides topic_prefix for one tenant
//! payload = "full-resource"               # or "id-only"
//! topic_payload = { "fhir.r4.Patient" = "id-only" }
//! security_protocol = "sasl_ssl"
//! sasl_mechanism = "SCRAM-SHA-512"
//! sasl_username = "tributary"
//! sasl_password = "…"
//! ssl_ca_location = "/etc/tributary/kafka-ca.pem"
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
#[error("invalid value for `kafka.{key}`: {value:?} — {allowed}")]
pub struct KafkaConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

fn invalid(key: &str, value: impl ToString, allowed: &str) -> KafkaConfigError {
    KafkaConfigError {
        key: key.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// What a record's value carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadMode {
    /// The FHIR resource JSON as committed (`application/fhir+json`); deletes and message-level
    /// events fall back to the id-only notification.
    FullResource,
    /// A small JSON notification: event id, type, resource type/id/version, patient id. Consumers
    /// fetch the resource from the FHIR API with their own token.
    IdOnly,
}

/// The Kafka relay. Every event committed to the outbox is sent to exactly one topic, keyed by
/// the (pseudonymous) patient id so a consumer sees each patient's events in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]` (librdkafka `bootstrap.servers`).
    pub brokers: String,
    /// Client id the brokers see in their logs and quotas.
    pub client_id: String,
    /// Name of this relay's outbox cursor. Two relays with different names each get every event;
    /// change it only to replay everything still in the outbox to a new cluster.
    pub cursor_name: String,
    /// Topic for FHIR resource change events (`fhir.<Type>.create|update|delete`).
    /// `{resource_type}` is replaced; empty = do not publish resource changes.
    pub resource_topic: String,
    /// Topic for source-message events (`hl7v2.adt.A01`, …). `{event_type}` is replaced;
    /// empty = do not publish them.
    pub source_event_topic: String,
    /// Prefix put before every topic name; `{tenant}` is replaced by the event's tenant.
    pub topic_prefix: String,
    /// Per-tenant prefixes that replace `topic_prefix` for that tenant.
    pub tenant_prefixes: BTreeMap<String, String>,
    /// Default record value: `full-resource` or `id-only`.
    pub payload: PayloadMode,
    /// Per-topic value override, keyed by the topic name without prefix (`fhir.r4.Patient`).
    pub topic_payload: BTreeMap<String, PayloadMode>,
    /// CloudEvents `source` attribute (`ce_source` header); `{tenant}` is replaced.
    pub event_source: String,
    /// Create missing topics through the admin API before the first send.
    pub create_topics: bool,
    /// Partitions of topics the relay creates.
    pub topic_partitions: i32,
    /// Replication factor of topics the relay creates; -1 = the broker's default.
    pub topic_replication: i32,
    /// Most records sent but not yet acknowledged by the brokers (memory bound); the rest wait
    /// in the outbox.
    pub max_in_flight: usize,
    /// Largest resource sent as a record's value (bytes). A bigger one (a large Binary or
    /// DocumentReference) goes as the id-only notification instead, with the header
    /// `ce_payload: id-only`, and consumers read it from the facade: a record over the
    /// producer's or topic's size limit would be refused on every attempt and hold up every
    /// event behind it. Keep it under librdkafka's `message.max.bytes` (1,000,000) and the
    /// topics' `max.message.bytes`.
    pub max_record_bytes: usize,
    /// librdkafka `linger.ms`: how long to wait to fill a batch.
    pub linger_ms: u64,
    /// librdkafka `compression.type`: none, gzip, snappy, lz4 or zstd.
    pub compression: String,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// SASL mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or GSSAPI.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// Never logged; prefer the environment (`TRIBUTARY_KAFKA__SASL_PASSWORD`).
    pub sasl_password: Option<String>,
    /// CA bundle (PEM) to verify the brokers.
    pub ssl_ca_location: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    pub ssl_certificate_location: Option<String>,
    /// Client key (PEM) for mutual TLS.
    pub ssl_key_location: Option<String>,
    /// Any other librdkafka producer property, passed through as is. The relay's delivery
    /// guarantees (`enable.idempotence`, `acks`, `message.timeout.ms`, `bootstrap.servers`) cannot
    /// be overridden here.
    pub properties: BTreeMap<String, String>,
    /// First retry delay after a failed delivery or an unreachable cluster; doubles up to
    /// `retry_max_ms`. Events wait in the outbox meanwhile.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// When records wait this long without any acknowledgement, the relay discards its producer
    /// and re-sends from the cursor with a new one — whether the cluster answers or not (covers a
    /// cluster that came back without the topic, with other partitions or with lost producer
    /// state). Duplicates carry the same id.
    pub stall_timeout_secs: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            client_id: "tributary".into(),
            cursor_name: "kafka".into(),
            resource_topic: "fhir.r4.{resource_type}".into(),
            source_event_topic: "{event_type}".into(),
            topic_prefix: String::new(),
            tenant_prefixes: BTreeMap::new(),
            payload: PayloadMode::FullResource,
            topic_payload: BTreeMap::new(),
            event_source: "urn:tributary:{tenant}".into(),
            create_topics: true,
            topic_partitions: 3,
            topic_replication: -1,
            max_in_flight: 10_000,
            max_record_bytes: 900_000,
            linger_ms: 5,
            compression: "none".into(),
            security_protocol: "plaintext".into(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            properties: BTreeMap::new(),
            retry_initial_ms: 500,
            retry_max_ms: 30_000,
            stall_timeout_secs: 60,
        }
    }
}

/// Producer properties the relay owns: overriding them would break "no event lost, in order".
pub const RESERVED_PROPERTIES: [&str; 7] = [
    "bootstrap.servers",
    "enable.idempotence",
    "acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "max.in.flight.requests.per.connection",
    "retries",
];

fn valid_topic_chars(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '{' | '}'))
}

impl KafkaConfig {
    /// Checks every value without network access.
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        if self.brokers.trim().is_empty()
            || self.brokers.split(',').any(|b| {
                let b = b.trim();
                b.rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            })
        {
            return Err(invalid(
                "brokers",
                &self.brokers,
                "comma-separated host:port list, e.g. 127.0.0.1:9092",
            ));
        }
        if self.cursor_name.is_empty() {
            return Err(invalid("cursor_name", "", "a non-empty name"));
        }
        if self.max_record_bytes < 1024 {
            return Err(invalid(
                "max_record_bytes",
                self.max_record_bytes.to_string(),
                "at least 1024 (an id-only notification must fit)",
            ));
        }
        for (key, value, placeholder) in [
            ("resource_topic", &self.resource_topic, "{resource_type}"),
            (
                "source_event_topic",
                &self.source_event_topic,
                "{event_type}",
            ),
        ] {
            if !valid_topic_chars(value) {
                return Err(invalid(
                    key,
                    value,
                    "letters, digits, '.', '_', '-' and a placeholder",
                ));
            }
            let stripped = value.replace(placeholder, "");
            if stripped.contains('{') || stripped.contains('}') {
                return Err(invalid(
                    key,
                    value,
                    &format!("the only placeholder allowed here is {placeholder}"),
                ));
            }
        }
        let prefixes = std::iter::once(("topic_prefix".to_string(), &self.topic_prefix)).chain(
            self.tenant_prefixes
                .iter()
                .map(|(t, p)| (format!("tenant_prefixes.{t}"), p)),
        );
        for (key, value) in prefixes {
            if !valid_topic_chars(value) || value.replace("{tenant}", "").contains(['{', '}']) {
                return Err(invalid(
                    &key,
                    value,
                    "letters, digits, '.', '_', '-' and {tenant}",
                ));
            }
        }
        if self.topic_partitions < 1 {
            return Err(invalid(
                "topic_partitions",
                self.topic_partitions,
                "at least 1",
            ));
        }
        if self.topic_replication == 0 || self.topic_replication < -1 {
            return Err(invalid(
                "topic_replication",
                self.topic_replication,
                "-1 (broker default) or at least 1",
            ));
        }
        if self.stall_timeout_secs == 0 {
            return Err(invalid("stall_timeout_secs", 0, "at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("max_in_flight", 0, "at least 1"));
        }
        if self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return Err(invalid(
                "retry_initial_ms",
                self.retry_initial_ms,
                "greater than 0 and not above retry_max_ms",
            ));
        }
        const COMPRESSIONS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];
        if !COMPRESSIONS.contains(&self.compression.as_str()) {
            return Err(invalid(
                "compression",
                &self.compression,
                "one of: none, gzip, snappy, lz4, zstd",
            ));
        }
        const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
        if !PROTOCOLS.contains(&self.security_protocol.as_str()) {
            return Err(invalid(
                "security_protocol",
                &self.security_protocol,
                "one of: plaintext, ssl, sasl_plaintext, sasl_ssl",
            ));
        }
        let sasl = self.security_protocol.starts_with("sasl");
        const MECHANISMS: [&str; 5] = [
            "PLAIN",
            "SCRAM-SHA-256",
            "SCRAM-SHA-512",
            "OAUTHBEARER",
            "GSSAPI",
        ];
        match (&self.sasl_mechanism, sasl) {
            (None, true) => {
                return Err(invalid(
                    "sasl_mechanism",
                    "",
                    "required when security_protocol is sasl_*: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI",
                ))
            }
            (Some(m), _) if !MECHANISMS.contains(&m.as_str()) => {
                return Err(invalid(
                    "sasl_mechanism",
                    m,
                    "one of: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI",
                ))
            }
            (Some(m), false) => {
                return Err(invalid(
                    "sasl_mechanism",
                    m,
                    "only with security_protocol sasl_plaintext or sasl_ssl",
                ))
            }
            (Some(m), true) if m == "PLAIN" || m.starts_with("SCRAM") => {
                if self.sasl_username.as_deref().unwrap_or("").is_empty() {
                    return Err(invalid("sasl_username", "", "required for PLAIN and SCRAM"));
                }
                if self.sasl_password.is_none() {
                    return Err(invalid(
                        "sasl_password",
                        "",
                        "required for PLAIN and SCRAM (TRIBUTARY_KAFKA__SASL_PASSWORD)",
                    ));
                }
            }
            _ => {}
        }
        for k in self.properties.keys() {
            if RESERVED_PROPERTIES.contains(&k.as_str()) {
                return Err(invalid(
                    &format!("properties.{k}"),
                    k,
                    "set by the relay to keep delivery idempotent and ordered; remove it",
                ));
            }
        }
        Ok(())
    }

    /// The topic prefix for one tenant.
    pub fn prefix_for(&self, tenant: &str) -> String {
        self.tenant_prefixes
            .get(tenant)
            .unwrap_or(&self.topic_prefix)
            .replace("{tenant}", tenant)
    }

    /// librdkafka producer properties (secrets included: never log the result).
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = vec![
            ("bootstrap.servers".into(), self.brokers.clone()),
            ("client.id".into(), self.client_id.clone()),
            ("enable.idempotence".into(), "true".into()),
            ("acks".into(), "all".into()),
            // Never give up on a record: during an outage records wait in librdkafka (bounded by
            // max_in_flight) and the rest in the outbox; order per partition is kept.
            ("message.timeout.ms".into(), "0".into()),
            ("linger.ms".into(), self.linger_ms.to_string()),
            ("compression.type".into(), self.compression.clone()),
            ("security.protocol".into(), self.security_protocol.clone()),
            (
                "queue.buffering.max.messages".into(),
                (self.max_in_flight.max(1000) * 2).to_string(),
            ),
            ("reconnect.backoff.max.ms".into(), "2000".into()),
        ];
        let opt = [
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &self.sasl_password),
            ("ssl.ca.location", &self.ssl_ca_location),
            ("ssl.certificate.location", &self.ssl_certificate_location),
            ("ssl.key.location", &self.ssl_key_location),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                p.push((k.into(), v.clone()));
            }
        }
        for (k, v) in &self.properties {
            p.push((k.clone(), v.clone()));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<KafkaConfig, String> {
        let c: KafkaConfig = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse("").unwrap();
        assert_eq!(c, KafkaConfig::default());
        assert_eq!(c.prefix_for("t1"), "");
    }

    #[test]
    fn errors_name_key_value_and_allowed() {
        let e = parse("brokers = \"localhost\"").unwrap_err();
        assert!(
            e.contains("kafka.brokers") && e.contains("host:port"),
            "{e}"
        );
        let e = parse("security_protocol = \"sasl_ssl\"").unwrap_err();
        assert!(e.contains("kafka.sasl_mechanism"), "{e}");
        let e = parse(
            "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"u\"",
        )
        .unwrap_err();
        assert!(e.contains("kafka.sasl_password"), "{e}");
        let e = parse("[properties]\n\"enable.idempotence\" = \"false\"").unwrap_err();
        assert!(e.contains("properties.enable.idempotence"), "{e}");
        let e = parse("resource_topic = \"fhir.{tenant}\"").unwrap_err();
        assert!(e.contains("{resource_type}"), "{e}");
        let e = parse("payload = \"everything\"").unwrap_err();
        assert!(e.contains("full-resource"), "{e}");
        let e = parse("brokerz = \"x:1\"").unwrap_err();
        assert!(e.contains("brokerz"), "{e}");
    }

    #[test]
    fn tenant_prefixes_and_secrets_pass_through() {
        let c = parse(
            "topic_prefix = \"{tenant}.\"\ntenant_prefixes = { acme = \"acme-prod.\" }\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\nsasl_password = \"p\"\nssl_ca_location = \"/ca.pem\"",
        )
        .unwrap();
        assert_eq!(c.prefix_for("t1"), "t1.");
        assert_eq!(c.prefix_for("acme"), "acme-prod.");
        let props = c.producer_properties();
        for (k, v) in [
            ("enable.idempotence", "true"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.password", "p"),
            ("ssl.ca.location", "/ca.pem"),
            ("security.protocol", "sasl_ssl"),
        ] {
            assert!(props.contains(&(k.to_string(), v.to_string())), "{k}");
        }
    }
}
