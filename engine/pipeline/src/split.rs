//! A batch file in the journal (FHS/BHS … BTS/FTS, kept whole when the listener refused it, and
//! now replayed) is not mapped as one message: it is split into its messages, each journaled on
//! its own as if it had arrived alone from the same sender (keys and meta by
//! [`tributary_hl7v2::ingress`]), and the batch entry is marked committed with the note
//! [`SPLIT_NOTE`] saying what became of it. Its trailer counts are not checked again: replaying
//! it is the operator's decision to accept them.
//!
//! The messages are appended, durably, before the batch entry is marked done. After a crash in
//! between, the entry is still queued and is split again; each message appended the first time
//! is then found by its de-duplication key instead of being stored twice (the split messages
//! keep the batch's arrival time, so the journal's window counts from when the batch arrived).
//! A message found so is counted as a duplicate only when it is not this batch's own, or when
//! an earlier split of it finished (wrote the note): the same de-duplication finds a copy the
//! sender meanwhile resent, and nothing of the batch is stored twice.

use crate::{Outcome, Pipeline, PipelineError};
use futures_util::StreamExt;
use tributary_core::{Envelope, MessageId, MessageState};
use tributary_hl7v2::ingress::{split_journaled, SplitMessage};
use tributary_runtime::Runtime;
use tributary_storage::{JournalEntry, MessageUpdate, StorageError, StoreTransaction};

/// The journal note on a batch entry that was split: into how many messages, and how to find them.
pub const SPLIT_NOTE: &str = "split";

/// Appends in flight at once; submitted in batch order, so journal order is batch order.
const APPENDS_IN_FLIGHT: usize = 64;

impl Pipeline {
    pub(crate) async fn split_batch(
        &self,
        rt: &Runtime,
        entry: JournalEntry,
        env: &Envelope,
    ) -> Result<Outcome, PipelineError> {
        let version = self.registry.current().version.clone();
        if env.meta.get("truncated").is_some_and(|t| t == "true") {
            let reason = format!(
                "batch cannot be split: only its first {} bytes were kept at ingress; the sender must send it again",
                env.payload.len()
            );
            return self.fail(rt, env, entry.seq, reason, &version).await;
        }
        let split = match split_journaled(env) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("batch cannot be split: {e}");
                return self.fail(rt, env, entry.seq, reason, &version).await;
            }
        };
        let total = split.messages.len();
        // Without the note, no attempt at this split finished: messages found split from it are
        // an interrupted attempt's, to be counted (and followed) as journaled now. The note is
        // written once every message is appended and the followers queued again.
        let finished_before = rt.journal.notes(env.id)?.contains_key(SPLIT_NOTE);
        let journal = rt.journal.as_ref();
        let receipts: Vec<_> = futures_util::stream::iter(split.messages)
            .map(|m| async move {
                match m {
                    SplitMessage::Accepted(e) => (true, journal.append(e).await),
                    SplitMessage::Rejected { envelope, reason } => {
                        (false, journal.append_rejected(envelope, reason).await)
                    }
                }
            })
            .buffered(APPENDS_IN_FLIGHT)
            .collect()
            .await;
        let (mut fresh, mut duplicates, mut rejected) = (Vec::new(), 0usize, 0usize);
        for (accepted, receipt) in receipts {
            let r = receipt?;
            if !accepted {
                rejected += 1;
            } else if !r.duplicate {
                fresh.push(r.id);
            } else if !finished_before && self.split_earlier(rt, r.id, env.id)? {
                // appended by an earlier attempt at this split that did not finish
                fresh.push(r.id);
            } else {
                duplicates += 1;
            }
        }
        let followers = self.requeue_followers(rt, env, &fresh).await?;
        let mut note = format!(
            "into {total} message(s): {} journaled, {duplicates} already journaled (duplicates), {rejected} rejected; each has meta split_from = {}",
            fresh.len(),
            env.id
        );
        if followers > 0 {
            note.push_str(&format!(
                "; {followers} later message(s) of the same patients queued again behind them"
            ));
        }
        if !split.mismatches.is_empty() {
            let why: Vec<String> = split.mismatches.iter().map(ToString::to_string).collect();
            note.push_str(&format!(
                "; trailer counts not checked on replay: {}",
                why.join("; ")
            ));
        }
        rt.journal.set_note(env.id, SPLIT_NOTE, note).await?;
        rt.store
            .commit(StoreTransaction {
                tenant: env.tenant.to_string(),
                message: Some(MessageUpdate {
                    id: env.id,
                    state: MessageState::Committed,
                    mapping_version: None,
                    seq: Some(entry.seq),
                }),
                ..Default::default()
            })
            .await?;
        tracing::info!(
            message_id = %env.id,
            messages = total,
            journaled = fresh.len(),
            duplicates,
            rejected,
            followers,
            count_mismatches = split.mismatches.len(),
            "batch split into its messages"
        );
        Ok(Outcome::Split {
            messages: total,
            journaled: fresh.len(),
        })
    }

    /// Whether message `id` was split from `batch` (by an earlier, interrupted attempt).
    fn split_earlier(
        &self,
        rt: &Runtime,
        id: MessageId,
        batch: MessageId,
    ) -> Result<bool, PipelineError> {
        Ok(rt.journal.get(id)?.is_some_and(|r| {
            r.envelope.meta.get("split_from").map(String::as_str) == Some(&batch.to_string())
        }))
    }

    /// The split messages are mapped after everything already processed; later messages of the
    /// same senders and patients go again behind them, as `tributary replay` does, so that a
    /// patient's latest data stays the latest. Returns how many were queued again.
    async fn requeue_followers(
        &self,
        rt: &Runtime,
        batch: &Envelope,
        split: &[MessageId],
    ) -> Result<usize, PipelineError> {
        if split.is_empty() {
            return Ok(0);
        }
        let mut selected = Vec::with_capacity(split.len());
        for id in split {
            if let Some(st) = rt.journal.state(*id)? {
                selected.push((*id, batch.received_at, st));
            }
        }
        let tenant = Some(batch.tenant.as_str());
        let set = match tributary_storage::with_followers(rt.journal.as_ref(), selected, tenant) {
            Ok(set) => set,
            Err(StorageError::TooMany(_)) => {
                tracing::warn!(message_id = %batch.id, "too many later messages to queue again behind a split batch's messages; none were");
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        let split: std::collections::HashSet<&MessageId> = split.iter().collect();
        let followers: Vec<MessageId> = set
            .messages
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| !split.contains(id) && *id != batch.id)
            .collect();
        if !followers.is_empty() {
            rt.journal.replay(&followers).await?;
        }
        Ok(followers.len())
    }
}
