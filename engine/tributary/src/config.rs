//! `tributary.toml`: every key, its default and its meaning. The doc comments below are the
//! operator documentation; `deploy/tributary.example.toml` shows them all.
//!
//! Loading is parse → environment overrides → [`Config::validate`] (no I/O). Any key can be set
//! from the environment as `TRIBUTARY_<SECTION>__<KEY>` (double underscore between levels), e.g.
//! `TRIBUTARY_HTTP__LISTEN=0.0.0.0:8080` or `TRIBUTARY_DATA_DIR=/var/lib/tributary`.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for `{key}`: {value:?} — {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
}

/// The whole configuration. With no file at all, every default applies (the embedded setup).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding the journal, the FHIR store, the outbox, the audit log and local keys.
    /// Tributary writes nothing outside it, but the backups it is asked for (`[backup]`).
    pub data_dir: PathBuf,
    /// Tenant that messages and requests belong to when nothing else says (the embedded setup).
    pub default_tenant: String,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub mllp: MllpConfig,
    pub journal: JournalConfig,
    /// The hash-chained audit log: retention.
    pub audit: AuditConfig,
    /// Online backups (`tributary backup` against a running server, `POST /admin/backup`).
    pub backup: BackupConfig,
    /// How long delivered events stay in the outbox.
    pub outbox: OutboxConfig,
    /// The mapping pipeline: where the mapping sets live, the unconsumed-field policy, workers.
    pub mapping: tributary_pipeline::MappingConfig,
    /// The FHIR facade: authentication, break-glass, rate limits (see `tributary_facade::config`).
    pub facade: tributary_facade::FacadeConfig,
    /// Outbox → Kafka relay; absent = off (see `tributary_kafka::KafkaConfig`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<tributary_kafka::KafkaConfig>,
    /// RabbitMQ sink and/or queue source; absent = off (see `tributary_amqp::AmqpConfig`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<tributary_amqp::AmqpConfig>,
    /// FHIR Subscriptions out (rest-hook) and in; absent = off
    /// (see `tributary_subscriptions::SubscriptionsConfig`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<tributary_subscriptions::SubscriptionsConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./tributary-data"),
            default_tenant: "default".into(),
            log: LogConfig::default(),
            http: HttpConfig::default(),
            mllp: MllpConfig::default(),
            journal: JournalConfig::default(),
            audit: AuditConfig::default(),
            backup: BackupConfig::default(),
            outbox: OutboxConfig::default(),
            mapping: tributary_pipeline::MappingConfig::default(),
            facade: tributary_facade::FacadeConfig::default(),
            kafka: None,
            amqp: None,
            subscriptions: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` (human, for a terminal) or `json` (one object per line, for a log shipper).
    pub format: String,
    /// A `tracing` filter: `info`, `debug`, `tributary_storage=debug,info`, …
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            level: "info".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP server (FHIR facade, `/health`, `/ready`).
    pub listen: String,
    /// A facade request taking longer than this is abandoned and answered 503 (504 when it was
    /// waiting on a backend FHIR server), with an OperationOutcome; its audit record says so.
    pub request_timeout_secs: u64,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// A connection that moves no byte either way for this long (silent from the start, idle
    /// between keep-alive requests), or whose request head is not complete within it, is closed.
    pub idle_timeout_secs: u64,
    /// Most open connections at once; one more is closed as it is accepted.
    pub max_connections: usize,
    /// HTTPS: certificate and key (and, for client certificates, a CA bundle). Absent: plain
    /// HTTP, for a TLS-terminating proxy in front.
    pub tls: Option<tributary_runtime::tls::ListenerTlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            request_timeout_secs: 30,
            max_body_bytes: 10 << 20,
            idle_timeout_secs: 60,
            max_connections: 10_000,
            tls: None,
        }
    }
}

/// The `[mllp]` section (HL7 v2 over MLLP): `listen` for the default listener, and
/// `[[mllp.listeners]]` for more; every key is documented in `tributary_mllp::config`.
pub use tributary_mllp::MllpConfig;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// A message whose de-duplication key (partner + control id) was seen within this window is
    /// acknowledged again instead of being stored twice.
    pub dedup_window_secs: u64,
    /// Most writes sharing one fsync (group commit).
    pub max_group: usize,
    /// Writes waiting for the disk before writers are slowed down (backpressure).
    pub queue_bound: usize,
    pub retention: RetentionConfig,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            dedup_window_secs: 86_400,
            max_group: 2048,
            queue_bound: 16_384,
            retention: RetentionConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Processed messages (committed, and passed by every outbound route) older than this are
    /// pruned. Failed and rejected ones are kept until resolved, whatever their age.
    pub delivered_max_age_hours: u64,
    /// When the kept payloads exceed this many bytes, the oldest processed messages go first.
    /// 0 means no size limit.
    pub max_payload_bytes: u64,
    /// How often the pruner runs.
    pub prune_interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            delivered_max_age_hours: 24 * 7,
            max_payload_bytes: 0,
            prune_interval_secs: 300,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Audit records older than this many days are pruned by `tributary serve` (the chain stays
    /// verifiable from a stored anchor). 0 keeps every record forever (the default). Export
    /// first (`tributary audit export --until …`) if a SIEM or archive must keep them.
    pub retention_days: u64,
    /// How often audit retention runs, in seconds (when `retention_days` > 0).
    pub prune_interval_secs: u64,
    /// Size (MiB) at which an audit segment file is sealed and its index file written; the
    /// open segment is read back at start to rebuild its index in memory (1–1024).
    pub segment_mib: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 0,
            prune_interval_secs: 3600,
            segment_mib: 64,
        }
    }
}

/// The `[backup]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Where a running server writes the backups it is asked for, each in a directory of its
    /// own named by the time (`tributary-20261207T033000123Z`). Empty: online backups are off
    /// (a stopped server's data directory is backed up with `tributary backup --to DIR`). Must
    /// lie outside `data_dir`.
    pub dir: PathBuf,
    /// Online backups kept in `dir`: after a new one is written, the oldest beyond this many
    /// are deleted. 0 keeps them all.
    pub keep: usize,
    /// Take an online backup this often, in seconds (at least 60; needs `dir`). 0: only when
    /// asked for.
    pub every_secs: u64,
}

/// The `[outbox]` section: pruning of delivered events.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Events older than this that every registered relay (`[kafka]`, `[amqp.sink]`) and every
    /// active Subscription (`[subscriptions]`) has delivered are removed. 0 keeps every event.
    /// Nothing is pruned when neither a relay nor `[subscriptions]` is configured.
    pub max_age_secs: u64,
    /// How often the outbox pruner runs.
    pub prune_interval_secs: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_age_secs: 7 * 86_400,
            prune_interval_secs: 300,
        }
    }
}

fn invalid(key: &str, value: impl ToString, allowed: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

fn check_addr(key: &str, value: &str, may_be_empty: bool) -> Result<(), ConfigError> {
    if may_be_empty && value.is_empty() {
        return Ok(());
    }
    value
        .parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| invalid(key, value, "expected IP:PORT, e.g. 127.0.0.1:8080"))
}

fn check_positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, value, "must be greater than 0"));
    }
    Ok(())
}

impl Config {
    /// Reads the file (if any), applies `TRIBUTARY_*` environment overrides, validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.into(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_string()),
        };
        Self::from_toml(&text, &origin, std::env::vars())
    }

    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        apply_env(&mut table, env)?;
        let config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                origin: origin.into(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value without touching the network or the disk.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "", "a directory path"));
        }
        if self.backup.every_secs > 0
            && (self.backup.every_secs < 60 || self.backup.dir.as_os_str().is_empty())
        {
            return Err(invalid(
                "backup.every_secs",
                self.backup.every_secs,
                "0, or at least 60 with backup.dir set",
            ));
        }
        if !self.backup.dir.as_os_str().is_empty() && self.backup.dir.starts_with(&self.data_dir) {
            return Err(invalid(
                "backup.dir",
                self.backup.dir.display(),
                "a directory outside data_dir",
            ));
        }
        if self.default_tenant.is_empty()
            || !self
                .default_tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "default_tenant",
                &self.default_tenant,
                "letters, digits, - and _",
            ));
        }
        if !["pretty", "json"].contains(&self.log.format.as_str()) {
            return Err(invalid(
                "log.format",
                &self.log.format,
                "one of: pretty, json",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                &self.log.level,
                "a tracing filter such as info or debug",
            ));
        }
        check_addr("http.listen", &self.http.listen, false)?;
        self.mllp.validate().map_err(|e| ConfigError::Invalid {
            key: e.key,
            value: e.value,
            allowed: e.allowed,
        })?;
        check_positive("http.request_timeout_secs", self.http.request_timeout_secs)?;
        check_positive("http.max_body_bytes", self.http.max_body_bytes as u64)?;
        check_positive("http.idle_timeout_secs", self.http.idle_timeout_secs)?;
        check_positive("http.max_connections", self.http.max_connections as u64)?;
        if let Some((key, needs)) = self.http.tls.as_ref().and_then(|t| t.problem()) {
            return Err(invalid(&format!("http.tls.{key}"), "", needs));
        }
        self.mapping.validate().map_err(|e| ConfigError::Invalid {
            key: e.key,
            value: e.value,
            allowed: e.allowed,
        })?;
        check_positive("journal.max_group", self.journal.max_group as u64)?;
        check_positive("journal.queue_bound", self.journal.queue_bound as u64)?;
        check_positive(
            "journal.retention.prune_interval_secs",
            self.journal.retention.prune_interval_secs,
        )?;
        check_positive("audit.prune_interval_secs", self.audit.prune_interval_secs)?;
        if !(1..=1024).contains(&self.audit.segment_mib) {
            return Err(invalid(
                "audit.segment_mib",
                self.audit.segment_mib,
                "1 to 1024",
            ));
        }
        check_positive(
            "outbox.prune_interval_secs",
            self.outbox.prune_interval_secs,
        )?;
        self.facade.validate().map_err(|e| ConfigError::Invalid {
            key: e.key,
            value: e.value,
            allowed: e.allowed,
        })?;
        if let Some(k) = &self.kafka {
            k.validate()
                .map_err(|e| invalid(&format!("kafka.{}", e.key), e.value, &e.allowed))?;
        }
        if let Some(a) = &self.amqp {
            a.validate()
                .map_err(|e| invalid(&format!("amqp.{}", e.key), e.value, &e.allowed))?;
        }
        if let Some(s) = &self.subscriptions {
            s.validate()
                .map_err(|e| invalid(&format!("subscriptions.{}", e.key), e.value, &e.allowed))?;
        }
        self.check_outbox_cursors()
    }

    /// The configured outbox relays' cursors, as (config key, name).
    pub fn relay_cursors(&self) -> Vec<(&'static str, &str)> {
        let mut names: Vec<(&'static str, &str)> = Vec::new();
        if let Some(k) = &self.kafka {
            names.push(("kafka.cursor_name", &k.cursor_name));
        }
        if let Some(s) = self.amqp.as_ref().and_then(|a| a.sink.as_ref()) {
            names.push(("amqp.sink.cursor_name", &s.cursor_name));
        }
        names
    }

    /// Every outbox consumer keeps its own cursor: two relays sharing a name would overwrite
    /// each other's position (the slower one skipping events after a restart, retention pruning
    /// what it never delivered), as would a name in the Subscriptions' `sub:`/`substart:` space.
    fn check_outbox_cursors(&self) -> Result<(), ConfigError> {
        let names = self.relay_cursors();
        for (i, (key, name)) in names.iter().enumerate() {
            if name.starts_with("sub:") || name.starts_with("substart:") {
                return Err(invalid(
                    key,
                    name,
                    "a name outside the Subscriptions' `sub:` and `substart:` cursors",
                ));
            }
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                return Err(invalid(
                    key,
                    name,
                    &format!(
                        "a name of its own (`{other}` uses it: each relay keeps its own position)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `TRIBUTARY_HTTP__LISTEN=…` sets `http.listen`. Values are read as TOML when they parse
/// (numbers, booleans, arrays) and as strings otherwise.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("TRIBUTARY_") else {
            continue;
        };
        // TRIBUTARY_CONFIG names the file, TRIBUTARY_LOG is the log filter and TRIBUTARY_TOKEN the
        // admin commands' bearer token (`--token`): not config keys.
        if matches!(rest, "CONFIG" | "LOG" | "TOKEN") || rest.is_empty() {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let mut cur = &mut *table;
        for (i, seg) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cur.insert(seg.clone(), value.clone());
            } else {
                let entry = cur
                    .entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                cur = entry.as_table_mut().ok_or_else(|| {
                    invalid(
                        &path[..=i].join("."),
                        &name,
                        "this key is a value, not a section",
                    )
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml(text, "test.toml", env)
    }

    #[test]
    fn empty_config_is_the_embedded_default() {
        assert_eq!(load("", &[]).unwrap(), Config::default());
    }

    #[test]
    fn each_relay_keeps_its_own_outbox_cursor() {
        let both = |kafka: &str, amqp: &str| {
            load(
                &format!("[kafka]\nbrokers = \"127.0.0.1:9092\"\ncursor_name = \"{kafka}\"\n[amqp.sink]\ncursor_name = \"{amqp}\"\n"),
                &[],
            )
        };
        assert!(both("kafka", "amqp").is_ok());
        let msg = both("relay", "relay").unwrap_err().to_string();
        assert!(
            msg.contains("amqp.sink.cursor_name") && msg.contains("kafka.cursor_name"),
            "{msg}"
        );
        let msg = both("sub:t1/x", "amqp").unwrap_err().to_string();
        assert!(msg.contains("kafka.cursor_name"), "{msg}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("[http]\nlisten = \"127.0.0.1:1\"\nlistn = 3\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("listn") && msg.contains("listen"), "{msg}");
    }

    #[test]
    fn bad_value_names_key_value_and_allowed() {
        let msg = load("[log]\nformat = \"xml\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("log.format") && msg.contains("xml") && msg.contains("pretty, json"),
            "{msg}"
        );
        let msg = load("[http]\nlisten = \"localhost\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("http.listen") && msg.contains("IP:PORT"),
            "{msg}"
        );
        let msg = load("[audit]\nsegment_mib = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("audit.segment_mib") && msg.contains("1 to 1024"),
            "{msg}"
        );
        assert_eq!(
            load("[audit]\nsegment_mib = 8\n", &[])
                .unwrap()
                .audit
                .segment_mib,
            8
        );
    }

    #[test]
    fn wrong_type_is_reported_with_location() {
        let msg = load("[journal]\nmax_group = \"many\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("max_group"), "{msg}");
    }

    #[test]
    fn broker_sections_are_optional_and_validated() {
        let c = load("", &[]).unwrap();
        assert!(c.kafka.is_none() && c.amqp.is_none());
        let c = load(
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[amqp.sink]\nexchange = \"ev\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.kafka.unwrap().resource_topic, "fhir.r4.{resource_type}");
        assert_eq!(c.amqp.unwrap().sink.unwrap().exchange, "ev");
        let msg = load("[kafka]\nbrokers = \"nope\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("kafka.brokers") && msg.contains("host:port"),
            "{msg}"
        );
        let msg = load("[amqp.source]\nprefetch = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("amqp.source.prefetch"), "{msg}");
    }

    #[test]
    fn outbox_retention_is_configurable_and_validated() {
        let c = load("[outbox]\nmax_age_secs = 0\n", &[]).unwrap();
        assert_eq!(c.outbox.max_age_secs, 0);
        assert_eq!(c.outbox.prune_interval_secs, 300);
        let msg = load("[outbox]\nprune_interval_secs = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("outbox.prune_interval_secs"), "{msg}");
    }

    #[test]
    fn environment_overrides_file() {
        let c = load(
            "[http]\nlisten = \"127.0.0.1:1\"\n",
            &[
                ("TRIBUTARY_HTTP__LISTEN", "127.0.0.1:9999"),
                ("TRIBUTARY_JOURNAL__RETENTION__PRUNE_INTERVAL_SECS", "7"),
                ("TRIBUTARY_DATA_DIR", "/tmp/x"),
                ("UNRELATED", "1"),
            ],
        )
        .unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:9999");
        assert_eq!(c.journal.retention.prune_interval_secs, 7);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        let filter_only = load(
            "",
            &[
                ("TRIBUTARY_LOG", "warn"),
                ("TRIBUTARY_CONFIG", "x.toml"),
                ("TRIBUTARY_TOKEN", "eyJ.admin.token"),
            ],
        );
        assert_eq!(filter_only.unwrap(), Config::default());
        let err = load("", &[("TRIBUTARY_HTTP__PORT", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn mllp_listeners_are_configured_and_checked() {
        let c = load(
            "[mllp]\nlisten = \"\"\n[[mllp.listeners]]\nname = \"lab\"\nlisten = \"127.0.0.1:2576\"\n[[mllp.listeners.partners]]\nid = \"general-lab\"\nsource_cidrs = [\"10.0.0.0/8\"]\n",
            &[],
        )
        .unwrap();
        let l = c.mllp.effective_listeners();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].partners[0].id, "general-lab");
        let msg = load("[mllp]\nlisten = \"nowhere\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("mllp.listen") && msg.contains("IP:PORT"),
            "{msg}"
        );
        let msg = load(
            "[[mllp.listeners]]\nname = \"x\"\nack_after = \"later\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("later") && msg.contains("journal"), "{msg}");
    }
}
