//! Shared helpers: a listener over a temporary journal, raw MLLP clients, certificates.
#![allow(dead_code)]

mod pki;
#[allow(unused_imports)]
pub use pki::Pki;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use tributary_core::MessageId;
use tributary_mllp::source::ListenerStats;
use tributary_mllp::{ApplicationAck, ListenerContext, MllpListener, MllpListenerConfig};
use tributary_storage::{
    AuditLog, Db, DbOptions, FjallJournal, Journal, JournalRecord, ListFilter,
};

pub struct Harness {
    pub addr: SocketAddr,
    pub journal: Arc<FjallJournal>,
    pub audit: AuditLog,
    pub stats: Arc<ListenerStats>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub db: Db,
    pub dir: TempDir,
}

/// Binds `cfg` (its `listen` address) over `ctx` and runs it until the token is cancelled.
pub async fn listen(
    cfg: MllpListenerConfig,
    ctx: ListenerContext,
) -> (
    SocketAddr,
    Arc<ListenerStats>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    cfg.validate("mllp").unwrap();
    let listener = MllpListener::bind(cfg, "default", ctx).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = listener.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(listener.run(shutdown.clone()));
    (addr, stats, shutdown, task)
}

pub async fn start(cfg: MllpListenerConfig) -> Harness {
    start_with(cfg, true, None).await
}

pub async fn start_with(
    mut cfg: MllpListenerConfig,
    sync: bool,
    app_ack: Option<Arc<dyn ApplicationAck>>,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(
        dir.path(),
        DbOptions {
            sync,
            ..DbOptions::default()
        },
    )
    .unwrap();
    let journal = Arc::new(FjallJournal::new(db.clone(), 86_400_000));
    let audit = AuditLog::new(db.clone());
    cfg.listen = "127.0.0.1:0".into();
    let (addr, stats, shutdown, task) = listen(
        cfg,
        ListenerContext {
            journal: journal.clone(),
            audit: audit.clone(),
            app_ack,
            inbound_budget: None,
        },
    )
    .await;
    Harness {
        addr,
        journal,
        audit,
        stats,
        shutdown,
        task,
        db,
        dir,
    }
}

impl Harness {
    pub fn records(&self) -> Vec<JournalRecord> {
        self.journal
            .list(&ListFilter::default())
            .unwrap()
            .into_iter()
            .map(|(id, _, _)| self.journal.get(id).unwrap().unwrap())
            .collect()
    }

    pub fn record(&self, id: MessageId) -> JournalRecord {
        self.journal.get(id).unwrap().unwrap()
    }

    pub fn audit_bodies(&self) -> Vec<serde_json::Value> {
        self.audit
            .read_after(0, 100_000)
            .unwrap()
            .into_iter()
            .map(|e| e.body)
            .collect()
    }
}

pub fn frame(payload: &[u8]) -> Vec<u8> {
    tributary_mllp::codec::frame(payload)
}

pub fn adt(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|ADTAPP|GENHOSP|TRIB|HIE|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\rEVN|A01|20240101120000\rPID|1||PATID1234^^^GENHOSP^MR||EVERYMAN^ADAM\rPV1|1|I\r"
    )
    .into_bytes()
}

/// Sends one framed message on a fresh plain connection and returns the ACK payload.
pub async fn send_plain(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = tributary_mllp::sink::MllpSender::new(sender_cfg(addr));
    tokio::time::timeout(Duration::from_secs(30), s.send_once(payload))
        .await
        .expect("ACK within 30 s")
        .expect("ACK")
}

pub fn sender_cfg(addr: SocketAddr) -> tributary_mllp::sink::MllpSenderConfig {
    let mut c = tributary_mllp::sink::MllpSenderConfig::new(addr.to_string());
    c.ack_timeout = Duration::from_secs(30);
    c
}
