use crate::ids::{MessageId, PartnerId, TenantId};
use crate::time_util::now_millis;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The wire protocol a message arrived on; selects the parser and the mapping family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Hl7v2,
    Ccda,
    X12,
    Fhir,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Hl7v2 => "hl7v2",
            Protocol::Ccda => "ccda",
            Protocol::X12 => "x12",
            Protocol::Fhir => "fhir",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What every adapter hands to the journal: the raw bytes plus who sent them and how.
///
/// The payload stays bytes until its charset is known (HL7 MSH-18 may declare ISO 8859-1), so
/// nothing upstream of the parser decodes or re-encodes it. `meta` holds protocol facts such as
/// the message type and control id; it must never carry PHI, because it is logged and audited.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: MessageId,
    pub tenant: TenantId,
    pub partner: PartnerId,
    pub protocol: Protocol,
    /// Milliseconds since the Unix epoch at which the adapter finished reading the message.
    pub received_at: i64,
    /// Messages with the same key are processed strictly in journal order (sender + patient).
    pub ordering_key: String,
    /// When set, a second append with the same key within the journal's de-duplication window
    /// returns the first message instead of storing a copy (partner + HL7 MSH-10, for example).
    pub dedup_key: Option<String>,
    pub payload: Bytes,
    pub meta: BTreeMap<String, String>,
}

impl fmt::Debug for Envelope {
    /// Deliberately omits the payload: an `Envelope` in a log line must not leak PHI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("partner", &self.partner)
            .field("protocol", &self.protocol)
            .field("received_at", &self.received_at)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl Envelope {
    pub fn builder(protocol: Protocol, payload: impl Into<Bytes>) -> EnvelopeBuilder {
        EnvelopeBuilder {
            env: Envelope {
                id: MessageId::new(),
                tenant: TenantId::default(),
                partner: PartnerId::default(),
                protocol,
                received_at: now_millis(),
                ordering_key: String::new(),
                dedup_key: None,
                payload: payload.into(),
                meta: BTreeMap::new(),
            },
        }
    }
}

/// Builds an [`Envelope`] with a fresh id and the current time.
pub struct EnvelopeBuilder {
    env: Envelope,
}

impl EnvelopeBuilder {
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.env.tenant = TenantId(tenant.into());
        self
    }
    pub fn partner(mut self, partner: impl Into<String>) -> Self {
        self.env.partner = PartnerId(partner.into());
        self
    }
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.env.ordering_key = key.into();
        self
    }
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.env.dedup_key = Some(key.into());
        self
    }
    pub fn received_at(mut self, millis: i64) -> Self {
        self.env.received_at = millis;
        self
    }
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.meta.insert(key.into(), value.into());
        self
    }
    pub fn build(mut self) -> Envelope {
        if self.env.ordering_key.is_empty() {
            self.env.ordering_key = format!("{}/{}", self.env.tenant, self.env.partner);
        }
        self.env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_payload() {
        let env = Envelope::builder(Protocol::Hl7v2, &b"PID|1||12345^^^MRN||DOE^JANE"[..])
            .partner("lab")
            .build();
        let shown = format!("{env:?}");
        assert!(!shown.contains("DOE"));
        assert!(!shown.contains("12345"));
        assert!(shown.contains("payload_len"));
        assert_eq!(env.ordering_key, "default/lab");
    }
}
