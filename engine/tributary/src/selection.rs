//! Which journaled messages an operator means. One struct is the `journal list` and `replay`
//! flags, the query of `GET /admin/journal` and the body of `POST /admin/replay`, so the command
//! line and a running server select the same messages the same way.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tributary_core::{MessageId, StateKind};
use tributary_storage::{Journal, ListFilter, ReplaySet, StateRecord, VersionMatch};

#[derive(clap::Args, Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Selection {
    /// Only messages in this state: received, mapped, committed, delivered, failed or rejected.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Received at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Received before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Only this tenant's messages. Through a running server a call sees one tenant, the
    /// token's: the one named here, or the default tenant.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only messages from this partner: the `id` of an `[[mllp.listeners.partners]]` entry or an
    /// AMQP source's `partner`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    /// HL7 v2 message type: `ADT` (any trigger event) or `ADT^A08`.
    #[arg(long = "type", value_name = "TYPE")]
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// Last processed by the mapping version whose hash starts with this (`journal show`).
    #[arg(long, value_name = "HASH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped_by: Option<String>,
    /// Last processed by another mapping version than the current one: what an edited mapping
    /// set would now map differently.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
    /// At most this many messages, oldest first.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Message ids (UUIDs); the other criteria narrow them further.
    #[arg(value_name = "ID")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
}

/// One selected message as `journal list` prints it and the admin API returns it: ids, times,
/// states and mapping versions, never content.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub id: String,
    pub received_at: String,
    pub state: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl MessageRow {
    fn new(id: MessageId, at: i64, st: &StateRecord) -> Self {
        Self {
            id: id.to_string(),
            received_at: tributary_core::format_rfc3339_millis(at),
            state: st.state.kind().to_string(),
            attempts: st.attempts,
            mapping_version: st.mapping_version.clone(),
            reason: st.state.reason().map(str::to_string),
        }
    }

    /// One tab-separated line of `tributary journal list`: id, received, state, attempts, the
    /// mapping version's first 12 characters (`-`: never mapped), the failure reason.
    pub fn line(&self) -> String {
        let version = self.mapping_version.as_deref().unwrap_or("-");
        format!(
            "{}\t{}\t{}\tattempts={}\tversion={}\t{}",
            self.id,
            self.received_at,
            self.state,
            self.attempts,
            &version[..version.len().min(12)],
            self.reason.as_deref().unwrap_or("")
        )
    }
}

/// What `replay` selected and queued. `queued` is 0 for a dry run.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReplayReport {
    /// Messages the criteria selected.
    pub matched: usize,
    /// Later messages of the same ordering keys (sender and patient) added to keep the order.
    #[serde(default)]
    pub followers: usize,
    pub queued: usize,
    /// Matched messages and followers per state before the replay.
    pub by_state: BTreeMap<String, usize>,
    pub messages: Vec<MessageRow>,
}

impl ReplayReport {
    pub fn print(&self, dry_run: bool) {
        let states = if self.by_state.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = self
                .by_state
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect();
            format!(" ({})", parts.join(", "))
        };
        let followers = match self.followers {
            0 => String::new(),
            n => format!(
                ", with {n} later message(s) of the same senders and patients, so that all are mapped again in their original order"
            ),
        };
        if dry_run {
            for m in &self.messages {
                println!("{}", m.line());
            }
            if self.messages.len() < self.matched + self.followers {
                println!("(the first {} listed)", self.messages.len());
            }
            println!(
                "{} message(s) match{followers}{states}; nothing queued (--dry-run)",
                self.matched
            );
        } else {
            println!(
                "queued {} message(s) for mapping again{followers}{states}",
                self.queued
            );
        }
        if self.matched == REPLAY_MAX {
            println!("stopped at {REPLAY_MAX} messages: run the same command again for the next ones, or give --limit");
        }
    }
}

/// States a selection without `state` and without ids replays: every processed message. Pending
/// ones (`received`) are queued already; `rejected` ones were refused at the door and are
/// replayed only when asked for by state or id.
const REPLAYABLE: [StateKind; 4] = [
    StateKind::Mapped,
    StateKind::Committed,
    StateKind::Delivered,
    StateKind::Failed,
];

impl Selection {
    /// No criterion at all: a replay of that would re-run the whole journal, so it is refused.
    pub fn is_unbounded(&self) -> bool {
        let narrowed = Selection {
            limit: None,
            tenant: None,
            ..self.clone()
        };
        narrowed == Selection::default()
    }

    /// The storage filter. `default_states` applies when neither a state nor ids are given;
    /// `current` is the running (or configured) mapping set's version, which `stale` compares to.
    pub fn filter(
        &self,
        default_states: &[StateKind],
        current: Option<&str>,
    ) -> anyhow::Result<ListFilter> {
        let states = match self.state.as_deref() {
            Some(s) => vec![StateKind::parse(s).with_context(|| {
                format!("state {s:?}: expected one of received, mapped, committed, delivered, failed, rejected")
            })?],
            None if self.ids.is_empty() => default_states.to_vec(),
            None => Vec::new(),
        };
        let mapping_version = match (&self.mapped_by, self.stale) {
            (Some(_), true) => bail!("give either mapped_by or stale, not both"),
            (Some(v), false) => Some(VersionMatch::StartsWith(v.clone())),
            (None, true) => Some(VersionMatch::Not(
                current
                    .context("stale: no mapping set is loaded to compare with")?
                    .to_string(),
            )),
            (None, false) => None,
        };
        Ok(ListFilter {
            states,
            since: parse_time("since", &self.since)?,
            until: parse_time("until", &self.until)?,
            tenant: self.tenant.clone(),
            partner: self.partner.clone(),
            message_type: self.message_type.clone(),
            mapping_version,
            limit: self.limit,
        })
    }

    /// The filter of a replay: processed messages unless a state or ids say otherwise, and at
    /// most [`REPLAY_MAX`] unless `limit` says otherwise (a replayed message is `received` until
    /// it is mapped again, so running the same replay again takes the next ones).
    pub fn replay_filter(&self, current: Option<&str>) -> anyhow::Result<ListFilter> {
        let mut filter = self.filter(&REPLAYABLE, current)?;
        filter.limit.get_or_insert(REPLAY_MAX);
        Ok(filter)
    }

    /// The messages a replay queues: the selection and its followers
    /// ([`tributary_storage::with_followers`]), in journal order.
    pub fn select_for_replay(
        &self,
        journal: &dyn Journal,
        filter: &ListFilter,
    ) -> anyhow::Result<ReplaySet> {
        let selected = self.select(journal, filter)?;
        Ok(tributary_storage::with_followers(
            journal,
            selected,
            filter.tenant.as_deref(),
        )?)
    }

    /// Checks the criteria without a journal: what a command tests before asking a server.
    pub fn check(&self) -> anyhow::Result<()> {
        self.filter(&[], Some("")).map(|_| ())
    }

    /// The matching messages: with ids, those of them the filter admits, in the given order
    /// (an id the journal does not hold, or of another tenant, is an error naming it); without,
    /// every admitted message, oldest first.
    pub fn select(
        &self,
        journal: &dyn Journal,
        filter: &ListFilter,
    ) -> anyhow::Result<Vec<(MessageId, i64, StateRecord)>> {
        if self.ids.is_empty() {
            return Ok(journal.list(filter)?);
        }
        let mut out = Vec::new();
        let mut unknown = Vec::new();
        for s in &self.ids {
            let id: MessageId = s
                .parse()
                .with_context(|| format!("{s:?} is not a message id (UUID)"))?;
            let Some(rec) = journal.get(id)? else {
                unknown.push(s.as_str());
                continue;
            };
            if filter
                .tenant
                .as_deref()
                .is_some_and(|t| t != rec.envelope.tenant.as_str())
            {
                unknown.push(s.as_str());
                continue;
            }
            let at = rec.envelope.received_at;
            let in_time =
                filter.since.is_none_or(|s| at >= s) && filter.until.is_none_or(|u| at < u);
            if in_time && filter.admits(&rec) {
                out.push((id, at, rec.state));
            }
        }
        if !unknown.is_empty() {
            bail!("not in the journal: {}", unknown.join(", "));
        }
        out.truncate(filter.limit.unwrap_or(usize::MAX));
        Ok(out)
    }
}

/// Most messages one replay queues when the selection sets no `limit`: the selection is held
/// in memory, and a day of a busy feed is far below this.
pub const REPLAY_MAX: usize = 100_000;

/// Most message rows a replay report carries (the counts are always complete).
const REPORT_ROWS: usize = 1000;

/// Queues a replay selection (see [`Selection::select_for_replay`]) for mapping again, in the
/// order given, unless `dry_run`.
pub async fn replay(
    journal: &dyn Journal,
    set: ReplaySet,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    let ReplaySet {
        messages: selected,
        followers,
    } = set;
    let mut by_state = BTreeMap::new();
    for (_, _, st) in &selected {
        *by_state.entry(st.state.kind().to_string()).or_insert(0) += 1;
    }
    let ids: Vec<MessageId> = selected.iter().map(|(id, _, _)| *id).collect();
    let queued = if dry_run {
        0
    } else {
        journal.replay(&ids).await?.len()
    };
    Ok(ReplayReport {
        matched: selected.len() - followers,
        followers,
        queued,
        by_state,
        messages: rows(&selected[..selected.len().min(REPORT_ROWS)]),
    })
}

pub fn rows(selected: &[(MessageId, i64, StateRecord)]) -> Vec<MessageRow> {
    selected
        .iter()
        .map(|(id, at, st)| MessageRow::new(*id, *at, st))
        .collect()
}

pub fn parse_time(flag: &str, s: &Option<String>) -> anyhow::Result<Option<i64>> {
    s.as_deref()
        .map(|s| {
            tributary_core::parse_rfc3339_millis(s)
                .with_context(|| format!("{flag} {s:?}: expected RFC 3339 or YYYY-MM-DD"))
        })
        .transpose()
}

/// What `tributary journal show` prints and `GET /admin/journal/{id}` returns: a message's
/// envelope facts, state, history and notes, never its content. `None` when the journal does
/// not hold it or it belongs to another tenant than `tenant`.
pub fn message_summary(
    journal: &dyn Journal,
    id: MessageId,
    tenant: Option<&str>,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(rec) = journal.get(id)? else {
        return Ok(None);
    };
    let e = &rec.envelope;
    if tenant.is_some_and(|t| t != e.tenant.as_str()) {
        return Ok(None);
    }
    Ok(Some(serde_json::json!({
        "id": e.id.to_string(),
        "tenant": e.tenant,
        "partner": e.partner,
        "protocol": e.protocol,
        "received_at": tributary_core::format_rfc3339_millis(e.received_at),
        "ordering_key": e.ordering_key,
        "bytes": e.payload.len(),
        "meta": e.meta,
        "state": rec.state.state.kind(),
        "reason": rec.state.state.reason(),
        "attempts": rec.state.attempts,
        "mapping_version": rec.state.mapping_version,
        "notes": journal.notes(id)?,
        "history": rec.state.history.iter()
            .map(|(at, k)| format!("{} {k}", tributary_core::format_rfc3339_millis(*at)))
            .collect::<Vec<_>>(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_core::{Envelope, MessageState, Protocol};
    use tributary_storage::{Db, DbOptions, FjallJournal};

    async fn message(
        j: &FjallJournal,
        key: &str,
        trigger: &str,
        state: Option<MessageState>,
    ) -> MessageId {
        let env = Envelope::builder(Protocol::Hl7v2, &b"MSH|"[..])
            .ordering_key(key)
            .meta("message_type", "ADT")
            .meta("trigger_event", trigger)
            .build();
        let id = j.append(env).await.unwrap().id;
        if let Some(to) = state {
            j.transition(id, to, Some("v1".into())).await.unwrap();
        }
        id
    }

    #[tokio::test]
    async fn a_replay_takes_the_later_messages_of_the_same_ordering_keys_along_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = FjallJournal::new(Db::open(dir.path(), DbOptions::default()).unwrap(), 0);
        let done = || Some(MessageState::Committed);
        let earlier = message(&j, "lab/p1", "A08", done()).await;
        let admit = message(&j, "lab/p1", "A01", done()).await;
        let other = message(&j, "lab/p2", "A01", done()).await;
        let update = message(&j, "lab/p1", "A08", done()).await;
        let failed = message(
            &j,
            "lab/p1",
            "A08",
            Some(MessageState::Failed { reason: "x".into() }),
        )
        .await;
        let refused = j
            .append_rejected(
                Envelope::builder(Protocol::Hl7v2, &b"x"[..])
                    .ordering_key("lab/p1")
                    .build(),
                "bad".into(),
            )
            .await
            .unwrap()
            .id;
        let unrelated = message(&j, "lab/p3", "A08", done()).await;
        let pending = message(&j, "lab/p1", "A03", None).await;

        let sel = Selection {
            message_type: Some("ADT^A01".into()),
            ..Default::default()
        };
        let set = sel
            .select_for_replay(&j, &sel.replay_filter(None).unwrap())
            .unwrap();
        let ids: Vec<MessageId> = set.messages.iter().map(|(id, _, _)| *id).collect();
        assert_eq!(ids, vec![admit, other, update, failed, pending]);
        assert_eq!(set.followers, 3);
        for left_out in [earlier, refused, unrelated] {
            assert!(!ids.contains(&left_out));
        }

        let head = j.stats().head_seq;
        let report = replay(&j, set, false).await.unwrap();
        assert_eq!((report.matched, report.followers, report.queued), (2, 3, 5));
        let queued: Vec<MessageId> = j
            .entries_after(head, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(queued, ids, "re-queued in their original order");
    }

    #[test]
    fn a_replay_needs_a_criterion_and_defaults_to_processed_messages_up_to_the_cap() {
        let tenant_only = Selection {
            tenant: Some("t".into()),
            limit: Some(5),
            ..Default::default()
        };
        assert!(tenant_only.is_unbounded());
        let stale = Selection {
            stale: true,
            ..Default::default()
        };
        assert!(!stale.is_unbounded());
        let f = stale.replay_filter(Some("v2")).unwrap();
        assert_eq!(f.states, REPLAYABLE.to_vec());
        assert_eq!(f.limit, Some(REPLAY_MAX));
        assert_eq!(f.mapping_version, Some(VersionMatch::Not("v2".into())));
        // named ids are taken in any state; a state given replaces the default
        let ids = Selection {
            ids: vec!["x".into()],
            ..Default::default()
        };
        assert!(ids.replay_filter(None).unwrap().states.is_empty());
        let rejected = Selection {
            state: Some("rejected".into()),
            limit: Some(7),
            ..Default::default()
        };
        let f = rejected.replay_filter(None).unwrap();
        assert_eq!((f.states, f.limit), (vec![StateKind::Rejected], Some(7)));
    }

    #[test]
    fn malformed_criteria_are_named() {
        let err = |s: Selection| s.check().unwrap_err().to_string();
        assert!(err(Selection {
            state: Some("done".into()),
            ..Default::default()
        })
        .contains("expected one of received"));
        assert!(err(Selection {
            since: Some("yesterday".into()),
            ..Default::default()
        })
        .contains("since \"yesterday\""));
        assert!(err(Selection {
            stale: true,
            mapped_by: Some("ab".into()),
            ..Default::default()
        })
        .contains("not both"));
        let no_set = Selection {
            stale: true,
            ..Default::default()
        };
        assert!(no_set.filter(&[], None).is_err());
        // the admin API's body: a misspelt criterion is refused, not ignored
        assert!(serde_json::from_str::<Selection>(r#"{"stat": "failed"}"#).is_err());
        let sel: Selection = serde_json::from_str(r#"{"type": "ADT^A08", "ids": ["a"]}"#).unwrap();
        assert_eq!(sel.message_type.as_deref(), Some("ADT^A08"));
    }
}
