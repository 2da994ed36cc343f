//! Replaying a batch the MLLP listener refused whole (its trailer counts disagree): the
//! pipeline splits it into its messages, journaled as if they had arrived one by one, and maps
//! them. A real listener over a real socket journals the batch; the real mappings map it.

mod common;

use common::{fixture, repo};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tributary_core::{MessageId, MessageState, StateKind};
use tributary_mllp::header::Header;
use tributary_mllp::source::ListenerStats;
use tributary_mllp::{ListenerContext, MllpListener, MllpListenerConfig};
use tributary_pipeline::{MappingConfig, MappingRegistry, Pipeline, SPLIT_NOTE};
use tributary_runtime::Runtime;
use tributary_storage::{Db, DbOptions, JournalRecord, ListFilter};

struct Setup {
    rt: Runtime,
    pipeline: Pipeline,
    addr: SocketAddr,
    stats: Arc<ListenerStats>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A runtime with the default one-day de-duplication window, the repository's mappings, and an
/// MLLP listener journaling into it.
async fn setup(cfg: MllpListenerConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let rt = Runtime::embedded(db, 86_400_000);
    let registry = MappingRegistry::load(&repo().join("mappings/hl7v2")).expect("mappings load");
    let pipeline = Pipeline::new(Arc::new(registry), MappingConfig::default());
    let mut cfg = MllpListenerConfig {
        listen: "127.0.0.1:0".into(),
        ..cfg
    };
    cfg.name = "main".into();
    cfg.validate("mllp").unwrap();
    let ctx = ListenerContext {
        journal: rt.journal.clone(),
        audit: rt.audit.clone(),
        app_ack: None,
        inbound_budget: None,
    };
    let listener = MllpListener::bind(cfg, "default", ctx).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = listener.stats();
    let stop = CancellationToken::new();
    tokio::spawn(listener.run(stop.clone()));
    Setup {
        rt,
        pipeline,
        addr,
        stats,
        stop,
        _dir: dir,
    }
}

impl Setup {
    async fn send(&self, payload: &[u8]) -> Vec<u8> {
        let cfg = tributary_mllp::sink::MllpSenderConfig::new(self.addr.to_string());
        let mut s = tributary_mllp::sink::MllpSender::new(cfg);
        tokio::time::timeout(std::time::Duration::from_secs(30), s.send_once(payload))
            .await
            .expect("ACK within 30 s")
            .expect("ACK")
    }

    async fn drain(&self) {
        while self.pipeline.step(&self.rt).await.unwrap() > 0 {}
    }

    fn records(&self) -> Vec<JournalRecord> {
        self.rt
            .journal
            .list(&ListFilter::default())
            .unwrap()
            .into_iter()
            .map(|(id, _, _)| self.rt.journal.get(id).unwrap().unwrap())
            .collect()
    }

    fn listed(&self, state: StateKind) -> Vec<MessageId> {
        let filter = ListFilter {
            states: vec![state],
            ..Default::default()
        };
        let list = self.rt.journal.list(&filter).unwrap();
        list.into_iter().map(|(id, _, _)| id).collect()
    }

    fn split_from(&self, batch: MessageId) -> Vec<JournalRecord> {
        let batch = batch.to_string();
        self.records()
            .into_iter()
            .filter(|r| r.envelope.meta.get("split_from") == Some(&batch))
            .collect()
    }

    fn note(&self, id: MessageId) -> String {
        self.rt.journal.notes(id).unwrap()[SPLIT_NOTE].clone()
    }

    /// Sends a batch whose BTS-1 says one message more than it holds: kept whole as rejected.
    async fn refused_batch(&self, messages: &[Vec<u8>]) -> MessageId {
        let batch = miscounted(messages);
        let ack = self.send(&batch).await;
        assert!(
            String::from_utf8_lossy(&ack).contains("batch rejected"),
            "refused"
        );
        let rejected = self.listed(StateKind::Rejected);
        assert_eq!(rejected.len(), 1);
        let rec = self.rt.journal.get(rejected[0]).unwrap().unwrap();
        assert_eq!(&rec.envelope.payload[..], &batch[..]);
        assert!(rec
            .state
            .state
            .reason()
            .unwrap()
            .starts_with("batch count mismatch: batch 1: BTS-1 declares"));
        rejected[0]
    }

    /// How many versions the store holds of each resource mapping `message` gives.
    fn versions(&self, message: &[u8]) -> Vec<usize> {
        let mapped = self
            .pipeline
            .registry
            .current()
            .map_bytes(
                message,
                tributary_terminology::builtin(),
                &tributary_mapping::RunOptions {
                    tenant: "default",
                    lineage: false,
                    feed: None,
                },
            )
            .unwrap();
        mapped
            .entries()
            .map(|(t, id)| self.rt.store.history("default", t, id).unwrap().len())
            .collect()
    }
}

fn miscounted(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut b =
        b"FHS|^~\\&|SYNTH|RIVERSIDE|||||||F77\rBHS|^~\\&|SYNTH|RIVERSIDE|||||||B77\r".to_vec();
    for m in messages {
        b.extend_from_slice(m);
        if !m.ends_with(b"\r") {
            b.push(b'\r');
        }
    }
    b.extend_from_slice(format!("BTS|{}\rFTS|1\r", messages.len() + 1).as_bytes());
    b
}

fn message(name: &str) -> Vec<u8> {
    let mut m = fixture(name);
    while m.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        m.pop();
    }
    m.push(b'\r');
    m
}

#[tokio::test]
async fn a_replayed_miscounted_batch_is_split_into_its_messages_which_are_mapped_once() {
    let s = setup(MllpListenerConfig::default()).await;
    let messages = [message("ADT_A01.hl7"), message("ORU_R01.hl7")];
    let batch = s.refused_batch(&messages).await;
    s.drain().await;
    assert!(
        s.split_from(batch).is_empty(),
        "nothing processed before the replay"
    );

    s.rt.journal.replay(&[batch]).await.unwrap();
    s.drain().await;
    // the batch entry is done, and says what became of it
    let rec = s.rt.journal.get(batch).unwrap().unwrap();
    assert_eq!(rec.state.state, MessageState::Committed);
    assert!(s.listed(StateKind::Rejected).is_empty());
    assert!(s.listed(StateKind::Failed).is_empty());
    assert_eq!(
        s.note(batch),
        format!(
            "into 2 message(s): 2 journaled, 0 already journaled (duplicates), 0 rejected; each has meta split_from = {batch}; trailer counts not checked on replay: batch 1: BTS-1 declares 3 message(s), 2 received"
        )
    );
    // each message journaled on its own, in batch order, keyed as the listener keys it alone
    let split = s.split_from(batch);
    assert_eq!(split.len(), 2);
    for (r, m) in split.iter().zip(&messages) {
        let e = &r.envelope;
        assert_eq!(&e.payload[..], &m[..]);
        assert_eq!(
            (e.tenant.as_str(), e.partner.as_str()),
            ("default", "anonymous")
        );
        let h = Header::read(m).unwrap();
        assert_eq!(
            e.ordering_key,
            tributary_mllp::source::ordering_key("anonymous", m, &h)
        );
        assert!(e.ordering_key.starts_with("anonymous/p:"));
        assert_eq!(
            e.dedup_key.as_deref(),
            Some(tributary_mllp::source::dedup_key("anonymous", m, &h).as_str())
        );
        assert_eq!(e.meta["batch_control_id"], "B77");
        assert_eq!(e.meta["listener"], "main");
        assert_eq!(
            e.meta["control_id"],
            String::from_utf8_lossy(h.control_id())
        );
        assert_eq!(e.received_at, rec.envelope.received_at);
        assert_eq!(
            r.state.state,
            MessageState::Committed,
            "mapped and committed"
        );
    }
    assert!(split[0].state.seq < split[1].state.seq);
    // every resource of both messages is in the store
    let versions: Vec<Vec<usize>> = messages.iter().map(|m| s.versions(m)).collect();
    assert!(versions.iter().flatten().all(|v| *v >= 1), "{versions:?}");

    // replaying the batch again stores nothing new
    let before = s.records().len();
    s.rt.journal.replay(&[batch]).await.unwrap();
    s.drain().await;
    assert_eq!(s.records().len(), before);
    assert_eq!(s.split_from(batch).len(), 2);
    assert!(s
        .note(batch)
        .starts_with("into 2 message(s): 0 journaled, 2 already journaled (duplicates)"));
    assert_eq!(
        s.rt.journal.state(batch).unwrap().unwrap().state,
        MessageState::Committed
    );
    // nor does the sender sending its messages again: they are the ones already journaled
    for m in &messages {
        s.send(m).await;
    }
    assert_eq!(s.records().len(), before);
    assert_eq!(s.stats.duplicates.load(Ordering::Relaxed), 2);
    s.drain().await;
    let after: Vec<Vec<usize>> = messages.iter().map(|m| s.versions(m)).collect();
    assert_eq!(after, versions, "no resource written again");
    s.stop.cancel();
}

#[tokio::test]
async fn replaying_a_refused_batch_the_sender_meanwhile_resent_duplicates_nothing() {
    let s = setup(MllpListenerConfig::default()).await;
    let messages = [message("ADT_A01.hl7"), message("ORU_R01.hl7")];
    let batch = s.refused_batch(&messages).await;
    // the sender resends the batch, counted right this time: accepted and mapped
    let right = String::from_utf8(miscounted(&messages))
        .unwrap()
        .replace("BTS|3", "BTS|2");
    let ack = s.send(right.as_bytes()).await;
    assert!(!String::from_utf8_lossy(&ack).contains("batch rejected"));
    s.drain().await;
    let before = s.records();
    assert_eq!(before.len(), 3);
    let versions: Vec<Vec<usize>> = messages.iter().map(|m| s.versions(m)).collect();

    s.rt.journal.replay(&[batch]).await.unwrap();
    s.drain().await;
    assert_eq!(s.records().len(), 3, "no message stored twice");
    assert!(s.split_from(batch).is_empty());
    assert!(s.note(batch).starts_with(
        "into 2 message(s): 0 journaled, 2 already journaled (duplicates), 0 rejected"
    ));
    assert!(s.listed(StateKind::Rejected).is_empty());
    let after: Vec<Vec<usize>> = messages.iter().map(|m| s.versions(m)).collect();
    assert_eq!(after, versions, "no resource written again");
    s.stop.cancel();
}

/// A crash after some of a batch's messages were appended and before the batch entry was marked
/// done: the entry is split again, and the messages appended the first time are not stored twice.
#[tokio::test]
async fn a_split_interrupted_after_its_first_append_is_finished_without_duplicates() {
    let s = setup(MllpListenerConfig::default()).await;
    let messages = [message("ADT_A01.hl7"), message("ORU_R01.hl7")];
    let batch = s.refused_batch(&messages).await;
    s.rt.journal.replay(&[batch]).await.unwrap();
    // what the interrupted attempt left: the first message appended, the batch still queued
    let env = s.rt.journal.get(batch).unwrap().unwrap().envelope;
    let split = tributary_hl7v2::ingress::split_journaled(&env).unwrap();
    let Some(tributary_hl7v2::ingress::SplitMessage::Accepted(first)) =
        split.messages.into_iter().next()
    else {
        panic!("first message accepted");
    };
    let first = s.rt.journal.append(first).await.unwrap().id;
    s.drain().await;
    let split = s.split_from(batch);
    assert_eq!(split.len(), 2);
    assert_eq!(split[0].envelope.id, first);
    assert!(split
        .iter()
        .all(|r| r.state.state == MessageState::Committed));
    assert!(s
        .note(batch)
        .starts_with("into 2 message(s): 2 journaled, 0 already"));
    s.stop.cancel();
}

/// A later message of the same patient, mapped before the replay, is mapped again after the
/// batch's: its data stays the latest, as with `tributary replay`.
#[tokio::test]
async fn later_messages_of_the_batch_patients_are_mapped_again_behind_them() {
    let s = setup(MllpListenerConfig::default()).await;
    let batch = s.refused_batch(&[message("ADT_A01.hl7")]).await;
    let ack = s.send(&message("ADT_A08.hl7")).await;
    assert!(String::from_utf8_lossy(&ack).contains("MSA|CA"), "accepted");
    s.drain().await;
    let update = s.listed(StateKind::Committed)[0];
    s.rt.journal.replay(&[batch]).await.unwrap();
    s.drain().await;
    let admit = s.split_from(batch)[0].envelope.id;
    let (a, u) = (
        s.rt.journal.state(admit).unwrap().unwrap(),
        s.rt.journal.state(update).unwrap().unwrap(),
    );
    assert_eq!(
        (a.state.kind(), u.state.kind()),
        (StateKind::Committed, StateKind::Committed)
    );
    assert_eq!(u.attempts, 2);
    assert!(u.seq > a.seq, "the update is mapped after the admission");
    assert!(s
        .note(batch)
        .contains("1 later message(s) of the same patients queued again"));
    s.stop.cancel();
}

#[tokio::test]
async fn a_batch_that_cannot_be_split_fails_on_replay_with_the_reason() {
    let s = setup(MllpListenerConfig::default()).await;
    let bad =
        b"BHS|^~\\&|SYNTH|RIVERSIDE\rPID|1||X1\rMSH|^~\\&|A|B|C|D|||ADT^A01|U1|P|2.5\rBTS|1\r";
    s.send(bad).await;
    let rejected = s.listed(StateKind::Rejected);
    assert_eq!(rejected.len(), 1);
    s.rt.journal.replay(&rejected).await.unwrap();
    s.drain().await;
    let st = s.rt.journal.state(rejected[0]).unwrap().unwrap();
    assert_eq!(
        st.state.kind(),
        StateKind::Failed,
        "still waits for a human"
    );
    assert!(
        st.state
            .reason()
            .unwrap()
            .starts_with("batch cannot be split: "),
        "{:?}",
        st.state
    );
    assert_eq!(s.records().len(), 1, "nothing split from it");
    assert!(s.rt.journal.notes(rejected[0]).unwrap().is_empty());
    s.stop.cancel();
}

#[tokio::test]
async fn a_batch_kept_truncated_is_not_split() {
    let s = setup(MllpListenerConfig {
        max_frame_bytes: 1024,
        ..MllpListenerConfig::default()
    })
    .await;
    let messages = [message("ADT_A01.hl7"), message("ORU_R01.hl7")];
    s.send(&miscounted(&messages)).await;
    let rejected = s.listed(StateKind::Rejected);
    assert_eq!(rejected.len(), 1);
    s.rt.journal.replay(&rejected).await.unwrap();
    s.drain().await;
    let st = s.rt.journal.state(rejected[0]).unwrap().unwrap();
    assert_eq!(st.state.kind(), StateKind::Failed);
    assert!(st
        .state
        .reason()
        .unwrap()
        .starts_with("batch cannot be split: only its first"));
    assert_eq!(s.records().len(), 1);
    s.stop.cancel();
}
