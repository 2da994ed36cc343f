use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// A FHIR R4 resource type name as it may appear in a URL or reference: `[A-Z][A-Za-z0-9]*`,
/// at most 64 characters. (Whether the type exists is the caller's concern.)
pub fn valid_fhir_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.as_bytes()[0].is_ascii_uppercase()
        && t.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A FHIR R4 `id`: `[A-Za-z0-9\-\.]{1,64}`.
pub fn valid_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Identifier of one journaled message: a UUIDv7, so ids sort by arrival time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub uuid::Uuid);

impl MessageId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $default:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self($default.to_string())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }
    };
}

string_id!(
    /// A tenant: the unit of data isolation (one HIE member, one customer).
    TenantId,
    "default"
);
string_id!(
    /// A configured sending or receiving system (a hospital's ADT feed, a lab).
    PartnerId,
    "anonymous"
);

/// A deterministic, FHIR-legal resource id (`[A-Za-z0-9\-\.]{1,64}`) derived from its parts, so the
/// same source identifiers always produce the same id and replays never duplicate a resource.
pub fn deterministic_id(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = hasher.finalize();
    let mut id = String::with_capacity(32);
    for b in &digest[..16] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 15)]));
    }
    id
}

/// The journal's de-duplication key for an HL7 v2 message: `partner/MSH-10/<128-bit XXH3 of
/// everything after the MSH segment>`. A resend (even with a regenerated MSH-7) is a duplicate;
/// a different message that reuses a control id — senders whose counters restart do — is not,
/// and is stored.
///
/// XXH3, not SHA-256: it runs over every message body on the ingress path. Only one partner's
/// messages with one control id can collide, so a crafted collision could only make that
/// partner's own message look resent.
pub fn hl7v2_dedup_key(partner: &str, control_id: &str, after_msh: &[u8]) -> String {
    content_dedup_key(partner, control_id, after_msh)
}

/// `partner/label/<hash of content>`: the de-duplication key of a message from `partner` that
/// the sender labels `label` (a control id, a message id) — a resend has the same label and
/// content; a different message under a reused label does not. See [`hl7v2_dedup_key`].
pub fn content_dedup_key(partner: &str, label: &str, content: &[u8]) -> String {
    format!(
        "{partner}/{label}/{:032x}",
        xxhash_rust::xxh3::xxh3_128(content)
    )
}

/// The journal's ordering key for an HL7 v2 message: `partner/p:<hash of PID-3's first id and
/// its assigning authority>`, or `partner` when there is no PID-3. One patient's messages from
/// one sender are mapped in order, and the key carries no identifier in clear. `segments` are
/// the message's segments; the delimiters are the ones MSH-1 and MSH-2 declare.
pub fn hl7v2_ordering_key<'a>(
    partner: &str,
    segments: impl IntoIterator<Item = &'a [u8]>,
    field: u8,
    component: u8,
    repetition: u8,
) -> String {
    use sha2::{Digest, Sha256};
    for s in segments {
        if s.len() > 4 && &s[..3] == b"PID" && s[3] == field {
            let pid3 = s.split(|b| *b == field).nth(3).unwrap_or(&[]);
            let first = pid3.split(|b| *b == repetition).next().unwrap_or(&[]);
            let mut comps = first.split(|b| *b == component);
            let id = comps.next().unwrap_or(&[]);
            let authority = comps.nth(2).unwrap_or(&[]);
            if id.is_empty() {
                break;
            }
            let mut hasher = Sha256::new();
            hasher.update(id);
            hasher.update([0u8]);
            hasher.update(authority);
            let digest = hasher.finalize();
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            return format!("{partner}/p:{hex}");
        }
    }
    partner.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_ids_are_stable_and_boundary_safe() {
        let a = deterministic_id(&["t1", "Patient", "123", "MRN"]);
        assert_eq!(a, deterministic_id(&["t1", "Patient", "123", "MRN"]));
        assert_ne!(a, deterministic_id(&["t1", "Patient", "12", "3MRN"]));
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn message_ids_sort_by_creation() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a, a.to_string().parse().unwrap());
    }
}
