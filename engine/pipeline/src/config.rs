//! `[mapping]` in `tributary.toml`. The doc comments are the operator documentation.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What the pipeline does with a message some of whose non-empty source fields no rule consumed,
/// or some of whose source values the output had to leave out because they contradict the rest
/// (a Period `end` before its `start`: the `start` is kept, the `end` left out — FHIR R4
/// invariant per-1). Either way the report names source paths and reasons, never values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnconsumedPolicy {
    /// Commit. Each (message map, field path) is logged at WARN the first time it is seen, then
    /// at most one summary per message map every `report_log_interval_secs` (paths and counts,
    /// never values); `tributary mapping report` shows the counts kept in the data directory.
    Warn,
    /// Do not commit: mark the message failed (`quarantined: …`, listing the paths). It is
    /// re-queued automatically when a changed mapping set is loaded.
    Quarantine,
    /// Do not commit: mark the message failed (`rejected: …`); only `tributary replay` re-runs it.
    Reject,
}

/// One `[mapping.feeds.<partner>]` table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    pub unconsumed: UnconsumedPolicy,
}

/// The `[mapping]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MappingConfig {
    /// Directory of mapping sets; the HL7 v2 set is its `hl7v2/` subdirectory
    /// (message maps, segment maps, datatype maps; see mappings/hl7v2/README.md).
    pub dir: PathBuf,
    /// `warn` (default), `quarantine` or `reject`: see [`UnconsumedPolicy`].
    pub unconsumed: UnconsumedPolicy,
    /// Per feed (the sending partner's id, as the journal records it: an MLLP partner, the AMQP
    /// source's `partner`, an inbound Subscriptions partner), a policy other than `unconsumed`:
    /// `[mapping.feeds.new-lab] unconsumed = "quarantine"` holds a new lab feed's messages with
    /// unmapped fields while the others stay on `warn`.
    pub feeds: BTreeMap<String, FeedConfig>,
    /// Mapping workers. Messages with the same ordering key (sender + patient) always go to the
    /// same worker, so they are committed in journal order. A worker waits for each commit's
    /// fsync before its next message, so more workers than cores is the point: their commits
    /// share one fsync (group commit) while the CPU maps the next messages. Workers are tasks,
    /// not threads, each holding one message: with group commits of 10–20 ms under load, 16
    /// capped the pipeline below the MLLP ingest rate (docs/PERFORMANCE.md), hence 64. A worker
    /// that falls behind holds back only its own keys until the dispatcher's overflow is full.
    pub workers: usize,
    /// Seconds between checks of the mapping directory for changes; 0 turns hot reload off.
    pub reload_interval_secs: u64,
    /// Seconds between writes of the field report counts (unconsumed and left-out source fields
    /// per message map, see `tributary mapping report`) to the data directory; they are also
    /// written at shutdown. A crash loses at most this many seconds of counts (never messages).
    pub report_flush_secs: u64,
    /// Under `unconsumed = "warn"`: seconds between the log summaries of unconsumed and left-out
    /// fields (one line per message map, instead of one per message).
    pub report_log_interval_secs: u64,
    /// Most distinct (tenant, message map, message type, field) keys the field report tracks;
    /// observations of further keys are counted as overflow only. Bounds memory and storage.
    pub report_max_fields: usize,
}

impl Default for MappingConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("mappings"),
            unconsumed: UnconsumedPolicy::Warn,
            feeds: BTreeMap::new(),
            workers: 64,
            reload_interval_secs: 2,
            report_flush_secs: 5,
            report_log_interval_secs: 60,
            report_max_fields: 10_000,
        }
    }
}

/// A `[mapping]` value outside what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for `{key}`: {value:?} — {allowed}")]
pub struct MappingConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

impl MappingConfig {
    /// Checks values (no I/O: the directory is loaded, with file:line:col errors, at start).
    pub fn validate(&self) -> Result<(), MappingConfigError> {
        if self.dir.as_os_str().is_empty() {
            return Err(MappingConfigError {
                key: "mapping.dir".into(),
                value: String::new(),
                allowed: "a directory holding hl7v2/ (e.g. \"mappings\")".into(),
            });
        }
        if !(1..=256).contains(&self.workers) {
            return Err(MappingConfigError {
                key: "mapping.workers".into(),
                value: self.workers.to_string(),
                allowed: "1 to 256".into(),
            });
        }
        if self.reload_interval_secs > 3600 {
            return Err(MappingConfigError {
                key: "mapping.reload_interval_secs".into(),
                value: self.reload_interval_secs.to_string(),
                allowed: "0 (off) to 3600".into(),
            });
        }
        if !(1..=3600).contains(&self.report_flush_secs) {
            return Err(MappingConfigError {
                key: "mapping.report_flush_secs".into(),
                value: self.report_flush_secs.to_string(),
                allowed: "1 to 3600".into(),
            });
        }
        if !(1..=86_400).contains(&self.report_log_interval_secs) {
            return Err(MappingConfigError {
                key: "mapping.report_log_interval_secs".into(),
                value: self.report_log_interval_secs.to_string(),
                allowed: "1 to 86400".into(),
            });
        }
        if !(1..=1_000_000).contains(&self.report_max_fields) {
            return Err(MappingConfigError {
                key: "mapping.report_max_fields".into(),
                value: self.report_max_fields.to_string(),
                allowed: "1 to 1000000".into(),
            });
        }
        if let Some(name) = self.feeds.keys().find(|k| k.trim().is_empty()) {
            return Err(MappingConfigError {
                key: "mapping.feeds".into(),
                value: name.clone(),
                allowed: "a partner id".into(),
            });
        }
        Ok(())
    }

    /// The unconsumed-field policy for messages from `partner`.
    pub fn unconsumed_for(&self, partner: &str) -> UnconsumedPolicy {
        self.feeds
            .get(partner)
            .map_or(self.unconsumed, |f| f.unconsumed)
    }

    /// Whether some feed is under `warn` (then the summaries are logged).
    pub fn any_warn(&self) -> bool {
        self.unconsumed == UnconsumedPolicy::Warn
            || self
                .feeds
                .values()
                .any(|f| f.unconsumed == UnconsumedPolicy::Warn)
    }

    /// The HL7 v2 mapping set directory.
    pub fn hl7v2_dir(&self) -> PathBuf {
        self.dir.join("hl7v2")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_key_value_and_allowed() {
        let c = MappingConfig {
            workers: 0,
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "mapping.workers");
        assert!(e.to_string().contains("1 to 256"));
        assert!(MappingConfig::default().validate().is_ok());
        let bad: Result<MappingConfig, _> = toml::from_str("unconsumed = \"drop\"");
        assert!(bad.is_err());
        let bad: Result<MappingConfig, _> = toml::from_str("dirr = \"x\"");
        assert!(bad.is_err(), "unknown keys are refused");
    }

    #[test]
    fn a_feed_can_have_its_own_policy() {
        let c: MappingConfig =
            toml::from_str("unconsumed = \"warn\"\n[feeds.new-lab]\nunconsumed = \"quarantine\"\n")
                .unwrap();
        assert_eq!(c.unconsumed_for("new-lab"), UnconsumedPolicy::Quarantine);
        assert_eq!(c.unconsumed_for("old-lab"), UnconsumedPolicy::Warn);
        assert!(c.any_warn());
        let c: MappingConfig =
            toml::from_str("unconsumed = \"reject\"\n[feeds.a]\nunconsumed = \"reject\"\n")
                .unwrap();
        assert!(!c.any_warn());
        let bad: Result<MappingConfig, _> = toml::from_str("[feeds.a]\nunconsumed = \"drop\"\n");
        assert!(bad.is_err());
    }
}
