//! Counting, in memory, the source fields mapping left unconsumed or out, per tenant, feed,
//! message map, message type and path; merged into storage ([`FieldReportStore`]) every
//! `mapping.report_flush_secs` and at shutdown, and summarized in the log once per
//! `mapping.report_log_interval_secs` instead of one line per message.
//!
//! The hot path takes one short lock per message that has such fields. Memory is bounded: at
//! most `mapping.report_max_fields` distinct keys are tracked (those already stored included);
//! observations of further keys are only counted as overflow. A crash loses the counts gathered
//! since the last flush, never anything about the messages themselves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tributary_mapping::MappedBundle;
use tributary_storage::{FieldKey, FieldKind, FieldStats};

/// Most fields named in one log summary line (the rest are counted as "… N more").
const SUMMARY_FIELDS: usize = 20;

/// `PID-5[2].10.2` → `PID-5.10.2`, `OBX[3]-8` → `OBX-8`: occurrences and repetitions would make
/// one field many keys.
pub fn normalize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_brackets = false;
    for c in path.chars() {
        match c {
            '[' => in_brackets = true,
            ']' => in_brackets = false,
            _ if !in_brackets => out.push(c),
            _ => {}
        }
    }
    out
}

/// The fields of one mapped message worth counting: (kind, path, reason), each once.
pub fn fields_of(m: &MappedBundle) -> Vec<(FieldKind, String, String)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for f in &m.unconsumed {
        let item = (
            FieldKind::Unconsumed,
            normalize_path(&f.to_string()),
            String::new(),
        );
        if seen.insert(item.clone()) {
            out.push(item);
        }
    }
    for d in &m.dropped {
        let path = if d.source.is_empty() {
            "(constant)".to_string()
        } else {
            normalize_path(&d.source)
        };
        let reason = normalize_path(&format!("{}.{}: {}", d.resource_type, d.element, d.reason));
        let item = (FieldKind::LeftOut, path, reason);
        if seen.insert(item.clone()) {
            out.push(item);
        }
    }
    out
}

/// One message's fields to count.
pub struct Observation<'a> {
    pub tenant: &'a str,
    /// The sending partner; empty where there is none (sample files).
    pub feed: &'a str,
    pub message_map: &'a str,
    pub message_type: &'a str,
    pub message_id: &'a str,
    /// Unix milliseconds.
    pub at: i64,
    pub fields: &'a [(FieldKind, String, String)],
}

/// The log summary of one (tenant, message map) over one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub tenant: String,
    pub message_map: String,
    /// Messages of this map that had at least one such field.
    pub messages: u64,
    /// (kind, path, reason, messages), most frequent first.
    pub fields: Vec<(FieldKind, String, String, u64)>,
    /// Distinct fields beyond those listed.
    pub more: usize,
    /// Observations of fields not tracked (over `report_max_fields`) in this interval.
    pub overflow: u64,
}

impl fmt::Display for Summary {
    /// `12 message(s) of ADT_A01.yaml (tenant t1) had fields no rule consumed or left out:
    /// PID-11.7 (12), PV1-45 left out: Encounter.period.end: end before start (1)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} message(s) of {} (tenant {}) had fields no rule consumed or left out: ",
            self.messages, self.message_map, self.tenant
        )?;
        for (i, (kind, path, reason, n)) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match kind {
                FieldKind::Unconsumed => write!(f, "{path} ({n})")?,
                FieldKind::LeftOut => write!(f, "{path} left out: {reason} ({n})")?,
            }
        }
        if self.more > 0 {
            write!(f, ", … {} more", self.more)?;
        }
        if self.overflow > 0 {
            write!(
                f,
                "; {} observation(s) of further fields not tracked",
                self.overflow
            )?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct MapInterval {
    messages: u64,
    fields: HashMap<(FieldKind, String, String), u64>,
    overflow: u64,
}

struct Inner {
    /// Every key counted by this process or found in storage at start; at most `max_keys`.
    known: HashSet<FieldKey>,
    /// Counts since the last flush.
    pending: HashMap<FieldKey, FieldStats>,
    pending_overflow: HashMap<String, u64>,
    /// Counts since the last log summary, per (tenant, message map).
    interval: BTreeMap<(String, String), MapInterval>,
    interval_started: Instant,
}

/// What a flush takes out of the aggregator; give it back with [`FieldAggregator::restore`] if
/// the write failed.
#[derive(Debug, Default)]
pub struct Pending {
    pub deltas: Vec<(FieldKey, FieldStats)>,
    pub overflow: Vec<(String, u64)>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty() && self.overflow.is_empty()
    }
}

/// The in-memory side of the mapping field report.
pub struct FieldAggregator {
    inner: Mutex<Inner>,
    max_keys: usize,
    log_interval: Duration,
}

impl FieldAggregator {
    pub fn new(max_keys: usize, log_interval: Duration, now: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner {
                known: HashSet::new(),
                pending: HashMap::new(),
                pending_overflow: HashMap::new(),
                interval: BTreeMap::new(),
                interval_started: now,
            }),
            max_keys: max_keys.max(1),
            log_interval,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is plain counters: a panic elsewhere while holding it leaves nothing broken.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks keys already in storage as known (up to the cap): they are not announced as new.
    pub fn preload(&self, keys: impl IntoIterator<Item = FieldKey>) {
        let mut g = self.lock();
        for k in keys {
            if g.known.len() >= self.max_keys {
                break;
            }
            g.known.insert(k);
        }
    }

    /// Counts one message's fields; returns the keys seen for the first time (to log once).
    pub fn observe(&self, o: &Observation<'_>) -> Vec<FieldKey> {
        if o.fields.is_empty() {
            return Vec::new();
        }
        let mut new = Vec::new();
        let mut g = self.lock();
        let g = &mut *g;
        let slot = g
            .interval
            .entry((o.tenant.to_string(), o.message_map.to_string()))
            .or_default();
        slot.messages += 1;
        for (kind, path, reason) in o.fields {
            let key = FieldKey {
                tenant: o.tenant.to_string(),
                message_map: o.message_map.to_string(),
                message_type: o.message_type.to_string(),
                kind: *kind,
                path: path.clone(),
                reason: reason.clone(),
                feed: o.feed.to_string(),
            };
            if !g.known.contains(&key) {
                if g.known.len() >= self.max_keys {
                    *g.pending_overflow.entry(key.tenant).or_default() += 1;
                    slot.overflow += 1;
                    continue;
                }
                g.known.insert(key.clone());
                new.push(key.clone());
            }
            *slot
                .fields
                .entry((*kind, path.clone(), reason.clone()))
                .or_default() += 1;
            let delta = FieldStats {
                count: 1,
                first_seen: o.at,
                last_seen: o.at,
                example_message: o.message_id.to_string(),
            };
            match g.pending.get_mut(&key) {
                Some(s) => s.merge(&delta),
                None => {
                    g.pending.insert(key, delta);
                }
            }
        }
        new
    }

    /// Takes the counts gathered since the last flush.
    pub fn take_pending(&self) -> Pending {
        let mut g = self.lock();
        Pending {
            deltas: g.pending.drain().collect(),
            overflow: g.pending_overflow.drain().collect(),
        }
    }

    /// Puts back counts whose flush failed (merged with what arrived meanwhile).
    pub fn restore(&self, p: Pending) {
        let mut g = self.lock();
        for (k, s) in p.deltas {
            match g.pending.get_mut(&k) {
                Some(newer) => {
                    let mut older = s;
                    older.merge(newer);
                    *newer = older;
                }
                None => {
                    g.pending.insert(k, s);
                }
            }
        }
        for (t, n) in p.overflow {
            *g.pending_overflow.entry(t).or_default() += n;
        }
    }

    /// The log summaries, once `log_interval` has passed since the last ones (else nothing);
    /// starts the next interval.
    pub fn take_summaries(&self, now: Instant) -> Vec<Summary> {
        let mut g = self.lock();
        if now.saturating_duration_since(g.interval_started) < self.log_interval {
            return Vec::new();
        }
        g.interval_started = now;
        std::mem::take(&mut g.interval)
            .into_iter()
            .map(|((tenant, message_map), mi)| {
                let mut fields: Vec<_> = mi
                    .fields
                    .into_iter()
                    .map(|((k, p, r), n)| (k, p, r, n))
                    .collect();
                fields.sort_by(|a, b| b.3.cmp(&a.3).then_with(|| (a.0, &a.1).cmp(&(b.0, &b.1))));
                let more = fields.len().saturating_sub(SUMMARY_FIELDS);
                fields.truncate(SUMMARY_FIELDS);
                Summary {
                    tenant,
                    message_map,
                    messages: mi.messages,
                    fields,
                    more,
                    overflow: mi.overflow,
                }
            })
            .collect()
    }

    /// Distinct keys tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.lock().known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unconsumed(paths: &[&str]) -> Vec<(FieldKind, String, String)> {
        paths
            .iter()
            .map(|p| (FieldKind::Unconsumed, p.to_string(), String::new()))
            .collect()
    }

    fn obs<'a>(
        map: &'a str,
        id: &'a str,
        at: i64,
        fields: &'a [(FieldKind, String, String)],
    ) -> Observation<'a> {
        Observation {
            tenant: "t1",
            feed: "riverside",
            message_map: map,
            message_type: "ADT^A01",
            message_id: id,
            at,
            fields,
        }
    }

    #[test]
    fn paths_lose_occurrences_and_repetitions() {
        assert_eq!(normalize_path("OBX[3]-8"), "OBX-8");
        assert_eq!(normalize_path("PID-5[2].10.2"), "PID-5.10.2");
        assert_eq!(normalize_path("PID-11.7"), "PID-11.7");
        assert_eq!(
            normalize_path("Patient.name[1].period.end: end before start"),
            "Patient.name.period.end: end before start"
        );
    }

    #[test]
    fn counts_first_and_last_seen_and_announces_each_key_once() {
        let t0 = Instant::now();
        let a = FieldAggregator::new(100, Duration::from_secs(60), t0);
        let f1 = unconsumed(&["PID-11.7", "PID-13"]);
        let f2 = unconsumed(&["PID-11.7"]);
        let new = a.observe(&obs("ADT_A01.yaml", "m1", 100, &f1));
        assert_eq!(
            new.iter().map(|k| k.path.as_str()).collect::<Vec<_>>(),
            ["PID-11.7", "PID-13"]
        );
        assert!(a.observe(&obs("ADT_A01.yaml", "m2", 200, &f2)).is_empty());
        assert!(a.observe(&obs("ADT_A01.yaml", "m3", 300, &f2)).is_empty());
        // another message map is another key
        assert_eq!(a.observe(&obs("ADT_A03.yaml", "m4", 400, &f2)).len(), 1);
        assert!(a.observe(&obs("ADT_A03.yaml", "m5", 500, &[])).is_empty());

        let mut p = a.take_pending().deltas;
        p.sort_by(|x, y| x.0.cmp(&y.0));
        let got: Vec<_> = p
            .iter()
            .map(|(k, s)| {
                (
                    k.message_map.as_str(),
                    k.path.as_str(),
                    s.count,
                    s.first_seen,
                    s.last_seen,
                    s.example_message.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("ADT_A01.yaml", "PID-11.7", 3, 100, 300, "m3"),
                ("ADT_A01.yaml", "PID-13", 1, 100, 100, "m1"),
                ("ADT_A03.yaml", "PID-11.7", 1, 400, 400, "m4"),
            ]
        );
        assert!(a.take_pending().is_empty(), "taken once");
        // still known after the flush: not announced again
        assert!(a.observe(&obs("ADT_A01.yaml", "m6", 600, &f2)).is_empty());
        assert_eq!(a.take_pending().deltas[0].1.count, 1);
    }

    #[test]
    fn the_key_cap_bounds_memory_and_counts_what_overflowed() {
        let a = FieldAggregator::new(2, Duration::from_secs(60), Instant::now());
        let f = unconsumed(&["PID-11.7", "PID-13", "PID-14", "PID-15"]);
        assert_eq!(a.observe(&obs("ADT_A01.yaml", "m1", 1, &f)).len(), 2);
        assert_eq!(a.observe(&obs("ADT_A01.yaml", "m2", 2, &f)).len(), 0);
        assert_eq!(a.tracked(), 2);
        let p = a.take_pending();
        assert_eq!(p.deltas.len(), 2);
        assert!(p.deltas.iter().all(|(_, s)| s.count == 2));
        assert_eq!(p.overflow, vec![("t1".to_string(), 4)]);

        // keys preloaded from storage count against the cap and are not announced
        let b = FieldAggregator::new(2, Duration::from_secs(60), Instant::now());
        b.preload(p.deltas.iter().map(|(k, _)| k.clone()));
        assert!(b.observe(&obs("ADT_A01.yaml", "m3", 3, &f)).is_empty());
        assert_eq!(b.take_pending().overflow, vec![("t1".to_string(), 2)]);
    }

    #[test]
    fn a_failed_flush_is_restored_without_losing_newer_counts() {
        let a = FieldAggregator::new(10, Duration::from_secs(60), Instant::now());
        let f = unconsumed(&["PID-11.7"]);
        a.observe(&obs("ADT_A01.yaml", "m1", 10, &f));
        let taken = a.take_pending();
        a.observe(&obs("ADT_A01.yaml", "m2", 20, &f));
        a.restore(taken);
        let p = a.take_pending().deltas;
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].1,
            FieldStats {
                count: 2,
                first_seen: 10,
                last_seen: 20,
                example_message: "m2".into()
            }
        );
    }

    #[test]
    fn summaries_come_once_per_interval_most_frequent_first() {
        let t0 = Instant::now();
        let a = FieldAggregator::new(100, Duration::from_secs(60), t0);
        let f1 = unconsumed(&["PID-11.7", "PID-13"]);
        let f2 = unconsumed(&["PID-11.7"]);
        a.observe(&obs("ADT_A01.yaml", "m1", 1, &f1));
        a.observe(&obs("ADT_A01.yaml", "m2", 2, &f2));
        a.observe(&obs("ADT_A01.yaml", "m3", 3, &f2));
        assert!(a.take_summaries(t0 + Duration::from_secs(59)).is_empty());
        let s = a.take_summaries(t0 + Duration::from_secs(60));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].messages, 3);
        assert_eq!(
            s[0].to_string(),
            "3 message(s) of ADT_A01.yaml (tenant t1) had fields no rule consumed or left out: \
             PID-11.7 (3), PID-13 (1)"
        );
        // nothing more until the next interval has passed, and nothing to say if quiet
        a.observe(&obs("ADT_A01.yaml", "m4", 4, &f2));
        assert!(a.take_summaries(t0 + Duration::from_secs(90)).is_empty());
        assert_eq!(a.take_summaries(t0 + Duration::from_secs(121)).len(), 1);
        assert!(a.take_summaries(t0 + Duration::from_secs(400)).is_empty());
    }

    #[test]
    fn a_summary_lists_at_most_twenty_fields() {
        let t0 = Instant::now();
        let a = FieldAggregator::new(100, Duration::from_secs(1), t0);
        let paths: Vec<String> = (1..=25).map(|i| format!("ZXX-{i}")).collect();
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let f = unconsumed(&refs);
        a.observe(&obs("ADT_A01.yaml", "m1", 1, &f));
        let s = &a.take_summaries(t0 + Duration::from_secs(1))[0];
        assert_eq!(s.fields.len(), 20);
        assert_eq!(s.more, 5);
        assert!(s.to_string().ends_with(", … 5 more"), "{s}");
    }
}
