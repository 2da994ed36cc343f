//! The shared runtime: storage handles, readiness and shutdown, plus the [`Source`] and [`Sink`]
//! traits every adapter implements. The binary builds one [`Runtime`] and hands it to each
//! registered component.

use async_trait::async_trait;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tributary_core::MessageId;
use tributary_storage::{AuditLog, Db, FjallJournal, FjallStore, Journal, Store};

pub mod disclosure;
pub mod http;
pub mod http_server;
pub mod log_throttle;
pub mod metrics;
pub mod test_ports;
pub mod test_wait;
pub mod tls;
pub use disclosure::PatientsDisclosed;
pub use log_throttle::LogThrottle;
pub use metrics::{Metrics, Sample};

/// Health of one component as `/ready` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ComponentStatus {
    Starting,
    Ready,
    /// Serving, but something it delivers to or pulls from is unreachable and its work waits
    /// durably (outbox, journal) until it returns: a Kafka or RabbitMQ broker, a downstream MLLP
    /// system, a backend FHIR server. It does not make the instance unready: taking the pod out
    /// of its Service would refuse the senders whose messages it can still store, and spread one
    /// downstream outage upstream. `reason` as for `Failed`.
    Degraded {
        reason: String,
    },
    /// Not serving; `reason` is for operators (no PHI: addresses, config keys, error kinds).
    Failed {
        reason: String,
    },
}

impl ComponentStatus {
    /// Ready or degraded: the component takes its share of the instance's work.
    pub fn serving(&self) -> bool {
        matches!(self, Self::Ready | Self::Degraded { .. })
    }
}

/// Readiness of every component: `/ready` answers 200 when every one is serving (`Ready` or
/// `Degraded`), and says `degraded` when any is.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<RwLock<BTreeMap<String, ComponentStatus>>>,
}

impl Readiness {
    pub fn set(&self, component: &str, status: ComponentStatus) {
        if let Ok(mut m) = self.inner.write() {
            m.insert(component.to_string(), status);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentStatus> {
        self.inner.read().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn all_serving(&self) -> bool {
        let snap = self.snapshot();
        !snap.is_empty() && snap.values().all(ComponentStatus::serving)
    }

    pub fn any_degraded(&self) -> bool {
        self.snapshot()
            .values()
            .any(|s| matches!(s, ComponentStatus::Degraded { .. }))
    }
}

/// Handles every component gets. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub db: Db,
    pub journal: Arc<dyn Journal>,
    pub store: Arc<dyn Store>,
    pub audit: AuditLog,
    pub readiness: Readiness,
    /// Operational counters served at `/metrics`.
    pub metrics: Metrics,
    /// Cancelled on SIGTERM/SIGINT: stop accepting, finish in-flight work, return.
    pub shutdown: CancellationToken,
}

impl Runtime {
    /// The embedded default: journal, store and audit log all over one fjall database.
    /// `dedup_window_ms` is the journal's de-duplication window (0: off).
    pub fn embedded(db: Db, dedup_window_ms: i64) -> Self {
        Self {
            journal: Arc::new(FjallJournal::new(db.clone(), dedup_window_ms)),
            store: Arc::new(FjallStore::new(db.clone())),
            audit: AuditLog::new(db.clone()),
            db,
            readiness: Readiness::default(),
            metrics: Metrics::default(),
            shutdown: CancellationToken::new(),
        }
    }
}

/// An ingress adapter's running listener (MLLP, SOAP, X12 over HTTP, AMQP queue, FHIR notifications).
#[async_trait]
pub trait Source: Send + 'static {
    fn name(&self) -> &str;
    /// Runs until `rt.shutdown` is cancelled; reports readiness under its name.
    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()>;
}

/// An egress relay draining the outbox (Kafka, AMQP, FHIR Subscriptions, downstream MLLP).
#[async_trait]
pub trait Sink: Send + 'static {
    fn name(&self) -> &str;
    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()>;
}

/// What the mapping pipeline did with one message, published once its write is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Processed {
    pub id: MessageId,
    pub outcome: ProcessedOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessedOutcome {
    /// Mapped and committed.
    Committed,
    /// Mapping failed; the reason names the mapping file, rule and source path (never a value).
    Failed { reason: String },
}

/// A bounded broadcast of [`Processed`] outcomes: the pipeline publishes, adapters that answer
/// after processing (HL7 v2 application ACKs, `ack_after = "mapped"`) listen. A slow listener
/// loses old entries (`Lagged`) and must fall back to reading the journal state, so nothing
/// depends on the feed alone.
#[derive(Clone)]
pub struct ProcessedFeed {
    tx: broadcast::Sender<Processed>,
}

impl ProcessedFeed {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Publishes an outcome; nobody listening is fine.
    pub fn publish(&self, p: Processed) {
        let _ = self.tx.send(p);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Processed> {
        self.tx.subscribe()
    }
}

impl Default for ProcessedFeed {
    fn default() -> Self {
        Self::new(4096)
    }
}
