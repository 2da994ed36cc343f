//! Operational counters in the Prometheus text format (`GET /metrics`).
//!
//! Components count what they do ([`Metrics::inc`], [`Metrics::observe`]); values read from the
//! stores at scrape time (journal head, outbox lag per relay, disk) are added by the caller of
//! [`Metrics::render`]. Label values are component names, interaction names, outcomes and
//! status codes — never message content, resource ids or identifiers: metrics leave the
//! deployment (a scraper), so they carry no PHI.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// `(name, type, help)` of every series a component may report.
const CATALOG: &[(&str, &str, &str)] = &[
    (
        "tributary_http_requests_total",
        "counter",
        "FHIR and admin requests answered, by interaction and HTTP status.",
    ),
    (
        "tributary_http_request_duration_seconds",
        "histogram",
        "Time from request to response (audit record durable), by interaction.",
    ),
    (
        "tributary_ingress_messages_total",
        "counter",
        "Messages offered by an ingress adapter, by source and outcome (accepted, duplicate, rejected).",
    ),
    (
        "tributary_pipeline_messages_total",
        "counter",
        "Journaled messages the mapping pipeline finished, by outcome (committed, failed, skipped; split: a batch file split into its messages; error: a storage failure, retried).",
    ),
    (
        "tributary_pipeline_worker_restarts_total",
        "counter",
        "Mapping workers that stopped outside the per-message panic guard and were started again.",
    ),
    (
        "tributary_pipeline_shard_backlog",
        "gauge",
        "Journal entries dispatched to a mapping worker (or waiting in the dispatcher's overflow for it) and not processed yet, by shard.",
    ),
    (
        "tributary_pipeline_dispatch_overflow",
        "gauge",
        "Journal entries the pipeline dispatcher holds because their shard's queue is full (at most 1,024 across shards).",
    ),
    (
        "tributary_pipeline_dispatch_overflow_full_total",
        "counter",
        "Times the dispatcher's overflow filled up and reading the journal waited for a shard to take entries.",
    ),
    (
        "tributary_mllp_messages_total",
        "counter",
        "Frames an MLLP listener answered, by listener and outcome (accepted, duplicate, rejected, rate_limited, busy).",
    ),
    (
        "tributary_mllp_connections_open",
        "gauge",
        "Open MLLP connections, by listener.",
    ),
    (
        "tributary_mllp_connections_total",
        "counter",
        "MLLP connections accepted, by listener.",
    ),
    (
        "tributary_mllp_connections_refused_total",
        "counter",
        "MLLP connections refused (unknown partner, connection limit), by listener.",
    ),
    (
        "tributary_mllp_timeouts_total",
        "counter",
        "MLLP connections closed for a read, write or idle timeout, by listener.",
    ),
    (
        "tributary_mllp_empty_batches_total",
        "counter",
        "HL7 v2 batches that held no message (acknowledged, nothing stored), by listener.",
    ),
    (
        "tributary_journal_head_seq",
        "gauge",
        "Sequence number of the newest journaled message.",
    ),
    (
        "tributary_outbox_head_seq",
        "gauge",
        "Sequence number of the newest outbox event.",
    ),
    (
        "tributary_outbox_lag_events",
        "gauge",
        "Outbox events a relay has not yet delivered, by relay.",
    ),
    (
        "tributary_store_disk_bytes",
        "gauge",
        "Bytes the embedded store occupies on disk.",
    ),
    (
        "tributary_store_commits_total",
        "counter",
        "Group commits of the embedded store (one fsync each).",
    ),
    (
        "tributary_store_commit_jobs_total",
        "counter",
        "Writes folded into the store's group commits.",
    ),
    (
        "tributary_store_slow_commits_total",
        "counter",
        "Group commits that took 10 ms or more.",
    ),
    (
        "tributary_audit_commits_total",
        "counter",
        "Group commits of the audit log (one fdatasync each).",
    ),
    (
        "tributary_audit_records_total",
        "counter",
        "Audit records written by those group commits.",
    ),
    (
        "tributary_audit_slow_commits_total",
        "counter",
        "Audit group commits that took 10 ms or more.",
    ),
    (
        "tributary_component_ready",
        "gauge",
        "1 when a component serves (ready or degraded), 0 otherwise.",
    ),
    (
        "tributary_component_degraded",
        "gauge",
        "1 when a component serves but something it delivers to is unreachable (work waits).",
    ),
];

type Labels = Vec<(&'static str, String)>;

enum Series {
    Counter(AtomicU64),
    Histogram {
        /// Non-cumulative counts per bucket; the last slot is `+Inf`.
        buckets: [AtomicU64; BUCKETS.len() + 1],
        count: AtomicU64,
        sum_micros: AtomicU64,
    },
}

/// Reads values a component keeps itself (its own atomics) when `/metrics` is scraped.
pub type Provider = Box<dyn Fn() -> Vec<Sample> + Send + Sync>;

/// Series by a hash of name and labels, so that counting an existing series (every request)
/// allocates nothing: the key is compared borrowed.
type SeriesMap = HashMap<u64, Vec<(&'static str, Labels, Arc<Series>)>>;

#[derive(Default)]
struct Inner {
    series: RwLock<SeriesMap>,
    outbox_consumers: RwLock<Vec<String>>,
    providers: RwLock<Vec<Provider>>,
}

/// Shared by every component through the runtime. Cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Inner>);

/// A value read at scrape time.
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Metrics {
    fn series(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
        make: fn() -> Series,
    ) -> Arc<Series> {
        let mut h = std::hash::DefaultHasher::new();
        (name, labels).hash(&mut h);
        let hash = h.finish();
        let same = |(n, l, _): &&(&'static str, Labels, Arc<Series>)| {
            *n == name
                && l.len() == labels.len()
                && l.iter()
                    .zip(labels)
                    .all(|((a, b), (c, d))| a == c && b == d)
        };
        if let Ok(map) = self.0.series.read() {
            if let Some((_, _, s)) = map.get(&hash).and_then(|v| v.iter().find(same)) {
                return s.clone();
            }
        }
        let mut map = self.0.series.write().unwrap_or_else(|p| p.into_inner());
        let bucket = map.entry(hash).or_default();
        if let Some((_, _, s)) = bucket.iter().find(same) {
            return s.clone();
        }
        let s = Arc::new(make());
        let owned = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        bucket.push((name, owned, s.clone()));
        s
    }

    /// Adds one to the counter `name` with these labels.
    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        if let Series::Counter(c) =
            &*self.series(name, labels, || Series::Counter(AtomicU64::new(0)))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records one duration in the histogram `name` with these labels.
    pub fn observe(&self, name: &'static str, labels: &[(&'static str, &str)], micros: u64) {
        let series = self.series(name, labels, || Series::Histogram {
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        });
        if let Series::Histogram {
            buckets,
            count,
            sum_micros,
        } = &*series
        {
            let secs = micros as f64 / 1e6;
            let slot = BUCKETS
                .iter()
                .position(|b| secs <= *b)
                .unwrap_or(BUCKETS.len());
            buckets[slot].fetch_add(1, Ordering::Relaxed);
            count.fetch_add(1, Ordering::Relaxed);
            sum_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// Adds values read at every scrape (e.g. a listener's own counters).
    pub fn provide(&self, provider: Provider) {
        self.0
            .providers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(provider);
    }

    /// Names an outbox consumer (a relay's cursor) whose lag `/metrics` reports.
    pub fn track_outbox_consumer(&self, name: &str) {
        let mut list = self
            .0
            .outbox_consumers
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if !list.iter().any(|n| n == name) {
            list.push(name.to_string());
        }
    }

    pub fn outbox_consumers(&self) -> Vec<String> {
        self.0
            .outbox_consumers
            .read()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Everything counted so far plus `samples`, in the Prometheus text exposition format.
    pub fn render(&self, samples: Vec<Sample>) -> String {
        enum Value {
            Counter(u64),
            Histogram(Vec<u64>, u64, u64),
            Gauge(f64),
        }
        let mut by_name: BTreeMap<&'static str, Vec<(Labels, Value)>> = BTreeMap::new();
        if let Ok(map) = self.0.series.read() {
            for (name, labels, s) in map.values().flatten() {
                let value = match &**s {
                    Series::Counter(c) => Value::Counter(c.load(Ordering::Relaxed)),
                    Series::Histogram {
                        buckets,
                        count,
                        sum_micros,
                    } => Value::Histogram(
                        buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
                        count.load(Ordering::Relaxed),
                        sum_micros.load(Ordering::Relaxed),
                    ),
                };
                by_name
                    .entry(name)
                    .or_default()
                    .push((labels.clone(), value));
            }
        }
        let provided: Vec<Sample> = self
            .0
            .providers
            .read()
            .map(|ps| ps.iter().flat_map(|p| p()).collect())
            .unwrap_or_default();
        for s in samples.into_iter().chain(provided) {
            by_name
                .entry(s.name)
                .or_default()
                .push((s.labels, Value::Gauge(s.value)));
        }
        let mut out = String::new();
        for (name, mut rows) in by_name {
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some((_, kind, help)) = CATALOG.iter().find(|(n, _, _)| *n == name) {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} {kind}");
            }
            for (labels, value) in rows {
                match value {
                    Value::Counter(v) => {
                        let _ = writeln!(out, "{name}{} {v}", label_text(&labels, None));
                    }
                    Value::Gauge(v) => {
                        let _ = writeln!(out, "{name}{} {v}", label_text(&labels, None));
                    }
                    Value::Histogram(buckets, count, sum_micros) => {
                        let mut cumulative = 0;
                        for (i, n) in buckets.iter().enumerate() {
                            cumulative += n;
                            let le = BUCKETS
                                .get(i)
                                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {cumulative}",
                                label_text(&labels, Some(&le))
                            );
                        }
                        let labels = label_text(&labels, None);
                        let _ = writeln!(out, "{name}_sum{labels} {}", sum_micros as f64 / 1e6);
                        let _ = writeln!(out, "{name}_count{labels} {count}");
                    }
                }
            }
        }
        out
    }
}

fn label_text(labels: &[(&'static str, String)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_samples_render_in_the_text_format() {
        let m = Metrics::default();
        m.inc(
            "tributary_http_requests_total",
            &[("interaction", "read"), ("status", "200")],
        );
        m.inc(
            "tributary_http_requests_total",
            &[("interaction", "read"), ("status", "200")],
        );
        m.inc(
            "tributary_http_requests_total",
            &[("interaction", "search"), ("status", "403")],
        );
        m.observe(
            "tributary_http_request_duration_seconds",
            &[("interaction", "read")],
            3_000,
        );
        m.observe(
            "tributary_http_request_duration_seconds",
            &[("interaction", "read")],
            20_000_000,
        );
        m.provide(Box::new(|| {
            vec![Sample {
                name: "tributary_mllp_connections_open",
                labels: vec![("listener", "adt".into())],
                value: 3.0,
            }]
        }));
        let text = m.render(vec![Sample {
            name: "tributary_outbox_lag_events",
            labels: vec![("relay", "a\"b".into())],
            value: 7.0,
        }]);
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE tributary_http_requests_total counter",
            "tributary_http_requests_total{interaction=\"read\",status=\"200\"} 2",
            "tributary_http_requests_total{interaction=\"search\",status=\"403\"} 1",
            "# TYPE tributary_http_request_duration_seconds histogram",
            "tributary_http_request_duration_seconds_bucket{interaction=\"read\",le=\"0.0025\"} 0",
            "tributary_http_request_duration_seconds_bucket{interaction=\"read\",le=\"0.005\"} 1",
            "tributary_http_request_duration_seconds_bucket{interaction=\"read\",le=\"10\"} 1",
            "tributary_http_request_duration_seconds_bucket{interaction=\"read\",le=\"+Inf\"} 2",
            "tributary_http_request_duration_seconds_sum{interaction=\"read\"} 20.003",
            "tributary_http_request_duration_seconds_count{interaction=\"read\"} 2",
            "tributary_outbox_lag_events{relay=\"a\\\"b\"} 7",
            "# TYPE tributary_mllp_connections_open gauge",
            "tributary_mllp_connections_open{listener=\"adt\"} 3",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn outbox_consumers_are_listed_once() {
        let m = Metrics::default();
        m.track_outbox_consumer("kafka");
        m.track_outbox_consumer("kafka");
        m.track_outbox_consumer("amqp");
        assert_eq!(m.outbox_consumers(), vec!["kafka", "amqp"]);
    }
}
