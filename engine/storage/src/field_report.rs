//! The mapping field report: per tenant, feed, message map, message type and source field path, how
//! many mapped messages had that field unconsumed (no rule read it) or its value left out of the
//! output (with the reason), when that was first and last seen, and the id of a recent such
//! message. Paths, reasons and message ids only — never a field value, so the report is PHI-free.
//!
//! The pipeline counts in memory and merges its counts here every few seconds (and at shutdown)
//! in one committer job; see `tributary_pipeline::FieldAggregator`.

use crate::db::{Db, Table};
use crate::keys;
use crate::{Result, StorageError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the mapping did with the source field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// A non-empty source field or component no rule read.
    Unconsumed,
    /// A value a rule read but the output had to leave out (`reason` says why).
    LeftOut,
}

impl FieldKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldKind::Unconsumed => "unconsumed",
            FieldKind::LeftOut => "left_out",
        }
    }
}

impl std::fmt::Display for FieldKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is counted: one source field of one message map, per tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FieldKey {
    pub tenant: String,
    /// The message map file that mapped the messages, e.g. `ADT_A01.yaml`.
    pub message_map: String,
    /// `ADT^A01`
    pub message_type: String,
    pub kind: FieldKind,
    /// The source path without segment occurrences or repetitions: `PID-11.7`, `OBX-8`.
    pub path: String,
    /// For `left_out`: the element and why, e.g. `Encounter.period.end: end before start`;
    /// empty for `unconsumed`.
    #[serde(default)]
    pub reason: String,
    /// The feed (sending partner) the messages came from; empty where it is not known (counts
    /// stored before feeds were counted apart, `tributary map --report` without `--feed`).
    #[serde(default)]
    pub feed: String,
}

impl FieldKey {
    /// A key without a feed is stored as before feeds were counted apart, so those counts go on.
    fn encode(&self) -> Vec<u8> {
        let mut parts = vec![
            self.tenant.as_bytes(),
            self.message_map.as_bytes(),
            self.message_type.as_bytes(),
            self.kind.as_str().as_bytes(),
            self.path.as_bytes(),
            self.reason.as_bytes(),
        ];
        if !self.feed.is_empty() {
            parts.push(self.feed.as_bytes());
        }
        keys::join(&parts)
    }
}

/// The counts of one [`FieldKey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldStats {
    /// Mapped messages that had this field (a message counts once per field, however many
    /// segment occurrences or repetitions had it). A replayed message is counted again.
    pub count: u64,
    /// Unix milliseconds.
    pub first_seen: i64,
    pub last_seen: i64,
    /// The id of the most recent message that had it (an id, never content).
    pub example_message: String,
}

impl FieldStats {
    /// Folds `later` (counts gathered after `self`) into `self`.
    pub fn merge(&mut self, later: &FieldStats) {
        self.count += later.count;
        self.first_seen = self.first_seen.min(later.first_seen);
        if later.last_seen >= self.last_seen {
            self.last_seen = later.last_seen;
            self.example_message = later.example_message.clone();
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FlatRow", into = "FlatRow")]
pub struct FieldReportRow {
    pub key: FieldKey,
    pub stats: FieldStats,
}

/// The wire form of [`FieldReportRow`]: key and counts side by side in one object. Spelled out
/// rather than `#[serde(flatten)]`, which cannot read numbers back when serde_json keeps them
/// exact (`arbitrary_precision`, which FHIR decimals need).
#[derive(Serialize, Deserialize)]
struct FlatRow {
    tenant: String,
    message_map: String,
    message_type: String,
    kind: FieldKind,
    path: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    feed: String,
    count: u64,
    first_seen: i64,
    last_seen: i64,
    example_message: String,
}

impl From<FlatRow> for FieldReportRow {
    fn from(r: FlatRow) -> Self {
        FieldReportRow {
            key: FieldKey {
                tenant: r.tenant,
                message_map: r.message_map,
                message_type: r.message_type,
                kind: r.kind,
                path: r.path,
                reason: r.reason,
                feed: r.feed,
            },
            stats: FieldStats {
                count: r.count,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                example_message: r.example_message,
            },
        }
    }
}

impl From<FieldReportRow> for FlatRow {
    fn from(r: FieldReportRow) -> Self {
        let (k, s) = (r.key, r.stats);
        FlatRow {
            tenant: k.tenant,
            message_map: k.message_map,
            message_type: k.message_type,
            kind: k.kind,
            path: k.path,
            reason: k.reason,
            feed: k.feed,
            count: s.count,
            first_seen: s.first_seen,
            last_seen: s.last_seen,
            example_message: s.example_message,
        }
    }
}

/// The stored report, rows sorted by count (highest first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldReport {
    pub rows: Vec<FieldReportRow>,
    /// Per tenant: field observations not counted because the pipeline already tracked its
    /// maximum of distinct fields (`mapping.report_max_fields`).
    pub overflow: BTreeMap<String, u64>,
}

impl FieldReport {
    /// A report of these rows, highest count first (then by key).
    pub fn from_rows(mut rows: Vec<FieldReportRow>, overflow: BTreeMap<String, u64>) -> Self {
        rows.sort_by(|a, b| {
            b.stats
                .count
                .cmp(&a.stats.count)
                .then_with(|| a.key.cmp(&b.key))
        });
        Self { rows, overflow }
    }
}

const OVERFLOW: &[u8] = b"field_report_overflow";

fn overflow_key(tenant: &str) -> Vec<u8> {
    keys::join(&[OVERFLOW, tenant.as_bytes()])
}

/// Durable home of the mapping field report.
#[derive(Clone)]
pub struct FieldReportStore {
    db: Db,
}

impl FieldReportStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Adds counts gathered since the last merge, and uncounted observations per tenant, in one
    /// durable write (resolves after the fsync).
    pub async fn merge(
        &self,
        deltas: Vec<(FieldKey, FieldStats)>,
        overflow: Vec<(String, u64)>,
    ) -> Result<()> {
        if deltas.is_empty() && overflow.is_empty() {
            return Ok(());
        }
        self.db
            .committer()
            .run(move |txn| {
                // Every read first, then every write: a job's point reads scan its own pending
                // writes, so interleaving them would cost the committer thread O(n²).
                let mut rows = Vec::with_capacity(deltas.len());
                for (key, delta) in deltas {
                    let k = key.encode();
                    let stats = match txn.get(Table::FieldReport, &k)? {
                        Some(v) => {
                            let row: FieldReportRow = serde_json::from_slice(&v)
                                .map_err(|e| StorageError::corrupt("mapping_field_report", e))?;
                            let mut s = row.stats;
                            s.merge(&delta);
                            s
                        }
                        None => delta,
                    };
                    rows.push((k, FieldReportRow { key, stats }));
                }
                let mut counts = Vec::with_capacity(overflow.len());
                for (tenant, n) in overflow {
                    let k = overflow_key(&tenant);
                    let old = txn
                        .get(Table::Meta, &k)?
                        .and_then(|v| keys::read_u64(&v))
                        .unwrap_or(0);
                    counts.push((k, old + n));
                }
                for (k, row) in rows {
                    let v = serde_json::to_vec(&row)
                        .map_err(|e| StorageError::corrupt("mapping_field_report", e))?;
                    txn.put(Table::FieldReport, k, v);
                }
                for (k, n) in counts {
                    txn.put(Table::Meta, k, keys::u64_be(n).to_vec());
                }
                Ok(())
            })
            .await
    }

    /// The report, for one tenant or all; rows by count, highest first.
    pub fn read(&self, tenant: Option<&str>) -> Result<FieldReport> {
        let iter = match tenant {
            Some(t) => self
                .db
                .prefix(Table::FieldReport, keys::prefix(&[t.as_bytes()])),
            None => self.db.range::<&[u8], _>(Table::FieldReport, ..),
        };
        let mut rows = Vec::new();
        for item in iter {
            let (_, v) = item.into_inner()?;
            let row: FieldReportRow = serde_json::from_slice(&v)
                .map_err(|e| StorageError::corrupt("mapping_field_report", e))?;
            rows.push(row);
        }
        let mut overflow = BTreeMap::new();
        let prefix = match tenant {
            Some(t) => overflow_key(t),
            None => keys::prefix(&[OVERFLOW]),
        };
        for item in self.db.prefix(Table::Meta, &prefix) {
            let (k, v) = item.into_inner()?;
            let t = &k[OVERFLOW.len() + 1..];
            if tenant.is_some_and(|t2| t2.as_bytes() != t) {
                continue;
            }
            let n = keys::read_u64(&v).unwrap_or(0);
            overflow.insert(String::from_utf8_lossy(t).into_owned(), n);
        }
        Ok(FieldReport::from_rows(rows, overflow))
    }

    /// Every stored key (the pipeline starts from these, so a field it already reported is not
    /// announced as new after a restart).
    pub fn keys(&self) -> Result<Vec<FieldKey>> {
        Ok(self.read(None)?.rows.into_iter().map(|r| r.key).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DbOptions;

    fn key(tenant: &str, path: &str, kind: FieldKind) -> FieldKey {
        FieldKey {
            tenant: tenant.into(),
            message_map: "ADT_A01.yaml".into(),
            message_type: "ADT^A01".into(),
            kind,
            path: path.into(),
            reason: if kind == FieldKind::LeftOut {
                "Encounter.period.end: end before start".into()
            } else {
                String::new()
            },
            feed: String::new(),
        }
    }

    fn stats(count: u64, first: i64, last: i64, example: &str) -> FieldStats {
        FieldStats {
            count,
            first_seen: first,
            last_seen: last,
            example_message: example.into(),
        }
    }

    #[tokio::test]
    async fn merges_survive_reopen_and_read_per_tenant_by_count() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), DbOptions::default()).unwrap();
            let s = FieldReportStore::new(db);
            s.merge(
                vec![
                    (
                        key("t1", "PID-11.7", FieldKind::Unconsumed),
                        stats(2, 100, 200, "m2"),
                    ),
                    (
                        key("t1", "PV1-45", FieldKind::LeftOut),
                        stats(1, 150, 150, "m3"),
                    ),
                    (
                        key("t2", "PID-11.7", FieldKind::Unconsumed),
                        stats(7, 50, 60, "x"),
                    ),
                ],
                vec![("t1".into(), 4)],
            )
            .await
            .unwrap();
            // a second flush adds to the counts, keeps the first sighting, moves the last one
            s.merge(
                vec![(
                    key("t1", "PV1-45", FieldKind::LeftOut),
                    stats(3, 300, 400, "m9"),
                )],
                vec![("t1".into(), 1)],
            )
            .await
            .unwrap();
            s.merge(vec![], vec![]).await.unwrap();
        }
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        let s = FieldReportStore::new(db);
        let r = s.read(Some("t1")).unwrap();
        assert_eq!(r.rows.len(), 2, "{r:?}");
        assert_eq!(r.rows[0].key, key("t1", "PV1-45", FieldKind::LeftOut));
        assert_eq!(r.rows[0].stats, stats(4, 150, 400, "m9"));
        assert_eq!(r.rows[1].key, key("t1", "PID-11.7", FieldKind::Unconsumed));
        assert_eq!(r.rows[1].stats, stats(2, 100, 200, "m2"));
        assert_eq!(r.overflow, BTreeMap::from([("t1".to_string(), 5)]));

        let all = s.read(None).unwrap();
        assert_eq!(all.rows.len(), 3);
        assert_eq!(all.rows[0].key.tenant, "t2", "sorted by count: {all:?}");
        assert!(
            s.read(Some("t")).unwrap().rows.is_empty(),
            "no prefix bleed"
        );
        assert!(s.read(Some("t")).unwrap().overflow.is_empty());
        assert_eq!(s.keys().unwrap().len(), 3);

        let json = serde_json::to_value(&r.rows[0]).unwrap();
        assert_eq!(json["kind"], "left_out");
        assert_eq!(json["path"], "PV1-45");
        assert_eq!(json["count"], 4);
    }

    /// Each feed's counts are its own; counts without a feed — rows stored before feeds were
    /// counted apart, whose JSON has no `feed` — read and go on under the feed-less key.
    #[tokio::test]
    async fn feeds_are_counted_apart_and_rows_without_a_feed_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = FieldReportStore::new(Db::open(dir.path(), DbOptions::default()).unwrap());
        let of = |feed: &str| FieldKey {
            feed: feed.into(),
            ..key("t1", "PID-11.7", FieldKind::Unconsumed)
        };
        s.merge(
            vec![
                (of(""), stats(1, 10, 10, "old")),
                (of("lab-a"), stats(2, 20, 30, "a")),
                (of("lab-b"), stats(5, 20, 40, "b")),
            ],
            vec![],
        )
        .await
        .unwrap();
        s.merge(vec![(of("lab-a"), stats(1, 50, 50, "a2"))], vec![])
            .await
            .unwrap();
        let rows = s.read(Some("t1")).unwrap().rows;
        let got: Vec<(&str, u64)> = rows
            .iter()
            .map(|r| (r.key.feed.as_str(), r.stats.count))
            .collect();
        assert_eq!(got, [("lab-b", 5), ("lab-a", 3), ("", 1)]);
        // the feed-less key is the one stored before feeds were counted apart
        assert_eq!(
            of("").encode(),
            keys::join(&[
                b"t1",
                b"ADT_A01.yaml",
                b"ADT^A01",
                b"unconsumed",
                b"PID-11.7",
                b""
            ])
        );
        let old = r#"{"tenant":"t1","message_map":"ADT_A01.yaml","message_type":"ADT^A01","kind":"unconsumed","path":"PID-11.7","count":3,"first_seen":1,"last_seen":2,"example_message":"m"}"#;
        let row: FieldReportRow = serde_json::from_str(old).unwrap();
        assert_eq!(row.key, of(""));
        assert_eq!(serde_json::to_value(&rows[0]).unwrap()["feed"], "lab-b");
    }
}
