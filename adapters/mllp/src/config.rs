//! `[mllp]` configuration. The doc comments are the operator documentation.
//!
//! ```toml
//! [mllp]
//! listen = "127.0.0.1:2575"          # the default, open, plain-TCP listener ("" disables it)
//!
//! [[mllp.listeners]]                 # more listeners, each with its own policy
//! name = "mllp-tls"
//! listen = "0.0.0.0:2576"
//! allow_unknown_partners = false
//! [mllp.listeners.tls]
//! cert = "/etc/tributary/mllp.crt"
//! key = "/etc/tributary/mllp.key"
//! client_ca = "/etc/tributary/partners-ca.crt"
//! require_client_cert = true
//! [[mllp.listeners.partners]]
//! id = "general-lab"
//! cert_names = ["lab.general.example"]
//! max_messages_per_sec = 200
//! ```

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid value for `{key}`: {value:?} — {allowed}")]
pub struct MllpConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

fn invalid(key: String, value: impl ToString, allowed: &str) -> MllpConfigError {
    MllpConfigError {
        key,
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// The `[mllp]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MllpConfig {
    /// Address of the default HL7 v2 MLLP listener (plain TCP, open to any sender, which is
    /// recorded as partner `anonymous`); empty disables it. For TLS, partners and rate limits,
    /// declare `[[mllp.listeners]]`.
    pub listen: String,
    /// Additional listeners with their own TLS, partner and acknowledgment settings.
    pub listeners: Vec<MllpListenerConfig>,
    /// Most bytes of unfinished messages buffered at once across every MLLP connection of every
    /// listener. A message whose remaining bytes do not fit is answered `AR`/`CE` "inbound
    /// buffer limit reached, retry" (not stored: the sender resends); the rest of it is discarded
    /// as it arrives. Must be at least every listener's `max_frame_bytes`.
    pub max_buffered_bytes: usize,
    /// Outbound routes: journaled HL7 v2 messages forwarded, byte for byte and in journal order,
    /// to downstream MLLP listeners (`[[mllp.routes]]`, see [`MllpRouteConfig`]).
    pub routes: Vec<MllpRouteConfig>,
}

/// One outbound route (HL7 v2 → v2). Every journaled message it selects is sent to
/// `destination`; the route waits for `AA`/`CA` before the next one, retries connection failures
/// and "retry" NAKs with backoff without limit, and records a downstream `AE`/`AR` on the message
/// (journal note `route.<name>`) before moving on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MllpRouteConfig {
    /// Name in logs, audit records and `/ready`; the journal cursor is `mllp.route.<name>`
    /// (renaming a route starts it again from the beginning of the journal).
    pub name: String,
    /// `host:port` of the downstream MLLP listener.
    pub destination: String,
    /// TLS towards the destination; absent means plain TCP.
    pub tls: Option<MllpClientTlsConfig>,
    /// Forward only these message types: `ADT` (any event) or `ADT^A01`. Empty: all.
    pub message_types: Vec<String>,
    /// Forward only messages from these partner ids. Empty: all.
    pub partners: Vec<String>,
    /// Time allowed to connect (and complete the TLS handshake).
    pub connect_timeout_secs: u64,
    /// Time allowed for the downstream's ACK of one message; then the message is sent again
    /// over a new connection.
    pub ack_timeout_secs: u64,
    /// First retry delay after a failure, in milliseconds; doubled per failure.
    pub backoff_initial_ms: u64,
    /// Longest retry delay, in seconds.
    pub backoff_max_secs: u64,
    /// Largest ACK accepted from the downstream, in bytes.
    pub max_frame_bytes: usize,
}

impl Default for MllpRouteConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            destination: String::new(),
            tls: None,
            message_types: Vec::new(),
            partners: Vec::new(),
            connect_timeout_secs: 10,
            ack_timeout_secs: 30,
            backoff_initial_ms: 200,
            backoff_max_secs: 30,
            max_frame_bytes: 1 << 20,
        }
    }
}

impl MllpRouteConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), MllpConfigError> {
        check_name(format!("{prefix}.name"), &self.name)?;
        check_host_port(&format!("{prefix}.destination"), &self.destination)?;
        if let Some(t) = &self.tls {
            t.validate(&format!("{prefix}.tls"))?;
        }
        for t in &self.message_types {
            let ok = t.split('^').count() <= 2
                && t.split('^').all(|p| {
                    !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            if !ok {
                return Err(invalid(
                    format!("{prefix}.message_types"),
                    t,
                    "a message code (ADT) or code^event (ADT^A01)",
                ));
            }
        }
        for (key, v) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("ack_timeout_secs", self.ack_timeout_secs),
            ("backoff_initial_ms", self.backoff_initial_ms),
            ("backoff_max_secs", self.backoff_max_secs),
        ] {
            if v == 0 {
                return Err(invalid(
                    format!("{prefix}.{key}"),
                    v,
                    "must be greater than 0",
                ));
            }
        }
        if self.max_frame_bytes < 64 {
            return Err(invalid(
                format!("{prefix}.max_frame_bytes"),
                self.max_frame_bytes,
                "at least 64 bytes",
            ));
        }
        Ok(())
    }
}

impl Default for MllpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:2575".into(),
            listeners: Vec::new(),
            max_buffered_bytes: 256 << 20,
            routes: Vec::new(),
        }
    }
}

impl MllpConfig {
    /// Every listener to run: the default one (when `listen` is set) first.
    pub fn effective_listeners(&self) -> Vec<MllpListenerConfig> {
        let mut out = Vec::new();
        if !self.listen.is_empty() {
            out.push(MllpListenerConfig {
                listen: self.listen.clone(),
                ..MllpListenerConfig::default()
            });
        }
        out.extend(self.listeners.iter().cloned());
        out
    }

    pub fn validate(&self) -> Result<(), MllpConfigError> {
        if !self.listen.is_empty() {
            check_addr("mllp.listen", &self.listen)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, l) in self.effective_listeners().iter().enumerate() {
            let prefix = if !self.listen.is_empty() && i == 0 {
                "mllp".to_string()
            } else {
                let idx = if self.listen.is_empty() { i } else { i - 1 };
                format!("mllp.listeners[{idx}]")
            };
            l.validate(&prefix)?;
            if l.max_frame_bytes > self.max_buffered_bytes {
                return Err(invalid(
                    "mllp.max_buffered_bytes".into(),
                    self.max_buffered_bytes,
                    &format!(
                        "at least {prefix}.max_frame_bytes ({}), or no message that large could ever be read",
                        l.max_frame_bytes
                    ),
                ));
            }
            if !names.insert(l.name.clone()) {
                return Err(invalid(
                    format!("{prefix}.name"),
                    &l.name,
                    "listener names must be unique (the default listener is named `mllp`)",
                ));
            }
        }
        let mut routes = std::collections::BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let prefix = format!("mllp.routes[{i}]");
            r.validate(&prefix)?;
            if !routes.insert(r.name.clone()) {
                return Err(invalid(
                    format!("{prefix}.name"),
                    &r.name,
                    "route names must be unique",
                ));
            }
        }
        Ok(())
    }
}

/// When the sender gets its acknowledgment.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckAfter {
    /// As soon as the message is durably in the journal (fsync'd). The default.
    #[default]
    Journal,
    /// After the mapping pipeline processed it: `AA` when mapped, `AE` with an ERR segment
    /// naming the failing field when mapping failed. Original acknowledgment mode only; in
    /// enhanced mode the commit ACK (`CA`) is still sent after the journal write.
    Mapped,
}

/// What a listener does with a batch whose BTS-1 (or FTS-1) count disagrees with what arrived.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BatchCountMismatch {
    /// Refuse the batch whole: kept as one rejected journal entry, every message answered
    /// `AR`/`CR`. The default: a count that disagrees can mean lost or merged messages.
    #[default]
    Reject,
    /// Process the messages that arrived; the mismatch is logged (counts only) and stated in the
    /// batch ACK's BTS-2/FTS-2. For senders known to miscount.
    Accept,
}

/// One MLLP listener.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MllpListenerConfig {
    /// Name in logs, audit records and `/ready` (letters, digits, `-`, `_`).
    pub name: String,
    /// `IP:PORT` to listen on.
    pub listen: String,
    /// Tenant of messages received here, unless the partner names its own; default: the
    /// top-level `default_tenant`.
    pub tenant: Option<String>,
    /// Largest accepted message (bytes between the MLLP start and end blocks). Larger frames are
    /// answered `AR`/`CR` "frame exceeds N bytes" and discarded without being buffered.
    pub max_frame_bytes: usize,
    /// Most simultaneous connections; further connections are closed at once (and logged).
    pub max_connections: usize,
    /// A connection with no complete message for this long is closed.
    pub idle_timeout_secs: u64,
    /// Once a message's start block arrived, the whole message must arrive within this time
    /// (protects against slow-drip clients). Also bounds the TLS handshake.
    pub read_timeout_secs: u64,
    /// An ACK that cannot be written within this time (the client does not read) closes the
    /// connection. The message stays journaled; the sender will resend and be ACKed as duplicate.
    pub write_timeout_secs: u64,
    /// `journal` (default) or `mapped`: see [`AckAfter`].
    pub ack_after: AckAfter,
    /// With `ack_after = "mapped"`: how long to wait for the pipeline. When it takes longer,
    /// the sender gets `AA` with MSA-3 "stored; mapping pending" (the message is safe).
    pub mapped_timeout_secs: u64,
    /// When true, a sender matching no partner is accepted as `default_partner`. When false, it
    /// gets `AR`/`CR` "unknown partner", an audit record, its bytes journaled as rejected, and
    /// the connection is closed.
    pub allow_unknown_partners: bool,
    /// Partner id recorded for senders matching no partner when `allow_unknown_partners`.
    pub default_partner: String,
    /// Honour MSH-15 `NE`/`ER`/`SU` literally and send no commit ACK where it says so. Off by
    /// default: most MLLP senders block until they get a reply, so a commit ACK is always sent.
    pub follow_msh15: bool,
    /// Write one PHI-free audit record per accepted message (refusals are always audited). It
    /// shares the journal's fsync.
    pub audit_accepted: bool,
    /// Enhanced mode: how long to wait for the mapping pipeline before an application ACK that
    /// MSH-16 asks for is given up. A give-up is recorded on the message (note `app_ack`) and
    /// audited, never silent.
    pub app_ack_timeout_secs: u64,
    /// Enhanced mode: most messages waiting for their application ACK on this listener. Beyond
    /// it, the commit ACK is still sent and the missing application ACK is recorded and audited.
    pub max_pending_app_acks: usize,
    /// When a sender resends a message already acknowledged at application level (a duplicate),
    /// send its application ACK again. Off: a duplicate gets its commit ACK only, unless the
    /// first application ACK was never delivered.
    pub resend_app_ack_on_duplicate: bool,
    /// `reject` (default) or `accept`: see [`BatchCountMismatch`].
    pub batch_count_mismatch: BatchCountMismatch,
    /// TLS for this listener; absent means plain TCP (loopback or VPN use).
    pub tls: Option<MllpTlsConfig>,
    /// The partners allowed to send here.
    pub partners: Vec<PartnerConfig>,
}

impl Default for MllpListenerConfig {
    fn default() -> Self {
        Self {
            name: "mllp".into(),
            listen: "127.0.0.1:2575".into(),
            tenant: None,
            max_frame_bytes: crate::codec::DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            idle_timeout_secs: 600,
            read_timeout_secs: 60,
            write_timeout_secs: 30,
            ack_after: AckAfter::Journal,
            mapped_timeout_secs: 30,
            allow_unknown_partners: true,
            default_partner: "anonymous".into(),
            follow_msh15: false,
            audit_accepted: true,
            app_ack_timeout_secs: 600,
            max_pending_app_acks: 10_000,
            resend_app_ack_on_duplicate: false,
            batch_count_mismatch: BatchCountMismatch::Reject,
            tls: None,
            partners: Vec::new(),
        }
    }
}

/// TLS settings of a listener (rustls; TLS 1.2 and 1.3 only); shared with the HTTP listener.
pub use tributary_runtime::tls::ListenerTlsConfig as MllpTlsConfig;

/// A sending system allowed on a listener.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PartnerConfig {
    /// Partner id: recorded on every message, part of the de-duplication key.
    pub id: String,
    /// Tenant of this partner's messages; default: the listener's tenant.
    pub tenant: Option<String>,
    /// Matches a TLS client certificate whose subject CN or any DNS/email/URI SAN equals one of
    /// these (case-insensitive).
    pub cert_names: Vec<String>,
    /// Matches connections from these address ranges (`10.1.0.0/16`, `192.0.2.7/32`).
    pub source_cidrs: Vec<String>,
    /// Messages per second this partner may send (across all its connections); excess messages
    /// get `AR`/`CE` "rate limited, retry". Absent: no limit.
    pub max_messages_per_sec: Option<f64>,
    /// Burst allowance above the rate; default: one second's worth.
    pub burst: Option<u32>,
    /// `host:port` of the partner's MLLP listener for enhanced-mode application ACKs whose
    /// connection closed before the message was processed. Absent: such an ACK is recorded on
    /// the message (note `app_ack`) and audited as undelivered.
    pub app_ack_return: Option<String>,
    /// TLS towards `app_ack_return`; absent means plain TCP.
    pub app_ack_return_tls: Option<MllpClientTlsConfig>,
}

/// TLS settings of an outbound MLLP connection (rustls; TLS 1.2 and 1.3 only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MllpClientTlsConfig {
    /// PEM bundle of the CAs that issue the receiver's certificate.
    pub ca: PathBuf,
    /// Name the receiver's certificate must carry (DNS SAN); default: the host of the address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM client certificate chain, for receivers that require mTLS (with `client_key`).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl MllpClientTlsConfig {
    fn validate(&self, key: &str) -> Result<(), MllpConfigError> {
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(invalid(
                format!("{key}.client_key"),
                "",
                "client_cert and client_key go together",
            ));
        }
        Ok(())
    }

    /// Loads the files (I/O) into a rustls client configuration and the name to verify.
    pub fn load(
        &self,
        addr: &str,
    ) -> Result<(std::sync::Arc<rustls::ClientConfig>, String), tributary_runtime::tls::TlsError>
    {
        let client = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let config = tributary_runtime::tls::client_config(Some(&self.ca), client)?;
        let name = self.server_name.clone().unwrap_or_else(|| {
            addr.rsplit_once(':')
                .map_or(addr, |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_string()
        });
        Ok((std::sync::Arc::new(config), name))
    }
}

fn check_addr(key: &str, value: &str) -> Result<(), MllpConfigError> {
    value
        .parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| invalid(key.into(), value, "expected IP:PORT, e.g. 127.0.0.1:2575"))
}

/// `host:port` with a non-empty host and a port (names are resolved when connecting).
fn check_host_port(key: &str, value: &str) -> Result<(), MllpConfigError> {
    match value.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(invalid(
            key.into(),
            value,
            "expected HOST:PORT, e.g. 10.1.2.3:2575 or lab.example.org:2575",
        )),
    }
}

fn check_name(key: String, value: &str) -> Result<(), MllpConfigError> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(key, value, "letters, digits, -, _ and ."));
    }
    Ok(())
}

impl MllpListenerConfig {
    /// Checks every value without I/O; `prefix` is the key path used in errors.
    pub fn validate(&self, prefix: &str) -> Result<(), MllpConfigError> {
        check_name(format!("{prefix}.name"), &self.name)?;
        check_addr(&format!("{prefix}.listen"), &self.listen)?;
        if let Some(t) = &self.tenant {
            check_name(format!("{prefix}.tenant"), t)?;
        }
        for (key, v) in [
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_connections", self.max_connections as u64),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("read_timeout_secs", self.read_timeout_secs),
            ("write_timeout_secs", self.write_timeout_secs),
            ("mapped_timeout_secs", self.mapped_timeout_secs),
            ("app_ack_timeout_secs", self.app_ack_timeout_secs),
            ("max_pending_app_acks", self.max_pending_app_acks as u64),
        ] {
            if v == 0 {
                return Err(invalid(
                    format!("{prefix}.{key}"),
                    v,
                    "must be greater than 0",
                ));
            }
        }
        if self.max_frame_bytes < 64 || self.max_frame_bytes > 1 << 30 {
            return Err(invalid(
                format!("{prefix}.max_frame_bytes"),
                self.max_frame_bytes,
                "between 64 and 1073741824 bytes",
            ));
        }
        check_name(format!("{prefix}.default_partner"), &self.default_partner)?;
        if let Some((key, needs)) = self.tls.as_ref().and_then(|t| t.problem()) {
            return Err(invalid(format!("{prefix}.tls.{key}"), "", needs));
        }
        if !self.allow_unknown_partners && self.partners.is_empty() {
            return Err(invalid(
                format!("{prefix}.partners"),
                "[]",
                "at least one partner when allow_unknown_partners = false",
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, p) in self.partners.iter().enumerate() {
            let pk = format!("{prefix}.partners[{i}]");
            check_name(format!("{pk}.id"), &p.id)?;
            if !ids.insert(&p.id) {
                return Err(invalid(
                    format!("{pk}.id"),
                    &p.id,
                    "partner ids must be unique",
                ));
            }
            if let Some(t) = &p.tenant {
                check_name(format!("{pk}.tenant"), t)?;
            }
            if p.cert_names.is_empty() && p.source_cidrs.is_empty() {
                return Err(invalid(
                    format!("{pk}.cert_names"),
                    "[]",
                    "a partner needs cert_names or source_cidrs to be recognised",
                ));
            }
            if !p.cert_names.is_empty() && self.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
                return Err(invalid(
                    format!("{pk}.cert_names"),
                    p.cert_names.join(","),
                    "matching by certificate needs tls.client_ca on this listener",
                ));
            }
            for c in &p.source_cidrs {
                c.parse::<IpNet>().map_err(|_| {
                    invalid(
                        format!("{pk}.source_cidrs"),
                        c,
                        "an address range such as 10.0.0.0/8 or 192.0.2.7/32",
                    )
                })?;
            }
            if let Some(r) = p.max_messages_per_sec {
                if !(r.is_finite() && r > 0.0) {
                    return Err(invalid(
                        format!("{pk}.max_messages_per_sec"),
                        r,
                        "a positive number",
                    ));
                }
            }
            if let Some(r) = &p.app_ack_return {
                check_host_port(&format!("{pk}.app_ack_return"), r)?;
            }
            if let Some(t) = &p.app_ack_return_tls {
                t.validate(&format!("{pk}.app_ack_return_tls"))?;
            }
            if p.burst == Some(0) {
                return Err(invalid(format!("{pk}.burst"), 0, "must be greater than 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_one_open_listener() {
        let c = MllpConfig::default();
        c.validate().unwrap();
        let l = c.effective_listeners();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "mllp");
        assert!(l[0].allow_unknown_partners);
    }

    #[test]
    fn errors_name_key_value_and_allowed() {
        let mut c = MllpConfig::default();
        c.listeners.push(MllpListenerConfig {
            name: "tls".into(),
            listen: "127.0.0.1:1".into(),
            partners: vec![PartnerConfig {
                id: "lab".into(),
                source_cidrs: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "mllp.listeners[0].partners[0].source_cidrs");
        assert_eq!(e.value, "10.0.0.0/33");
        c.listeners[0].partners[0].source_cidrs = vec!["10.0.0.0/8".into()];
        c.validate().unwrap();
        c.listeners[0].name = "mllp".into();
        assert_eq!(c.validate().unwrap_err().key, "mllp.listeners[0].name");
    }

    #[test]
    fn buffer_cap_covers_every_listener_frame() {
        let mut c = MllpConfig {
            max_buffered_bytes: 1 << 20,
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "mllp.max_buffered_bytes");
        assert!(e.allowed.contains("mllp.max_frame_bytes"), "{e}");
        c.max_buffered_bytes = crate::codec::DEFAULT_MAX_FRAME;
        c.validate().unwrap();
    }

    #[test]
    fn routes_are_checked() {
        let mut c: MllpConfig = toml::from_str(
            "[[routes]]\nname = \"lab-out\"\ndestination = \"lab.example.org:2575\"\nmessage_types = [\"ADT\", \"ORU^R01\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.routes[0].ack_timeout_secs, 30);
        c.routes[0].message_types.push("ORU^R01^X".into());
        assert_eq!(
            c.validate().unwrap_err().key,
            "mllp.routes[0].message_types"
        );
        c.routes[0].message_types.pop();
        c.routes[0].destination = "nowhere".into();
        assert_eq!(c.validate().unwrap_err().key, "mllp.routes[0].destination");
        assert!(
            toml::from_str::<MllpConfig>("[[routes]]\nname = \"x\"\ndest = \"a:1\"\n").is_err()
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<MllpListenerConfig>("lisen = \"x\"").unwrap_err();
        assert!(e.to_string().contains("lisen"));
    }

    #[test]
    fn cert_partners_need_a_client_ca() {
        let l = MllpListenerConfig {
            partners: vec![PartnerConfig {
                id: "lab".into(),
                cert_names: vec!["lab.example".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            l.validate("mllp").unwrap_err().key,
            "mllp.partners[0].cert_names"
        );
    }
}
