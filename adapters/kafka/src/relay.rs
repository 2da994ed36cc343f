//! The outbox → Kafka relay.
//!
//! Guarantees, and how:
//! - **Nothing lost.** The outbox cursor advances only past events whose delivery the brokers
//!   acknowledged (`acks=all`), and only contiguously: event n is acknowledged in the cursor only
//!   once every event before it is. A crash replays from the cursor.
//! - **In order per patient.** Records are keyed by patient id, the producer is idempotent
//!   (`enable.idempotence=true`) and `message.timeout.ms=0`: librdkafka never gives up on a record
//!   during a short outage, it keeps them queued in order (at most `max_in_flight`; the rest wait
//!   in the outbox) and sends them when the cluster returns. After `stall_timeout_secs` without
//!   an acknowledgement the relay drops that producer and starts a fresh one from the cursor, so
//!   a cluster that returns with lost state (topics, producer ids) is never sent stale batches.
//! - **Duplicates only with the same id.** After a permanent delivery error, a fatal producer
//!   error or a crash, the relay re-sends from the cursor; a consumer may then see an event
//!   twice, always with the same `ce_id`.
//! - **Visible.** Unreachable brokers, authentication failures and delivery errors set the
//!   `kafka` component to failed in `/ready`, with the error kind — never a payload.

use crate::config::KafkaConfig;
use crate::record::{self, KafkaRecord};
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_runtime::{ComponentStatus, Readiness};
use tributary_storage::Outbox;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] crate::config::KafkaConfigError),
    #[error("kafka client could not be created: {0}")]
    Client(KafkaError),
    #[error("outbox: {0}")]
    Outbox(#[from] tributary_storage::StorageError),
}

/// Receives librdkafka's global errors and logs: errors turn the component to failed in
/// `/ready`; logs go to `tracing` (librdkafka logs never contain record contents).
pub struct RelayContext {
    readiness: Readiness,
    component: String,
    failing: Arc<AtomicBool>,
}

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(component = %self.component, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(component = %self.component, facility = fac, "librdkafka: {message}")
            }
            _ => {
                tracing::debug!(component = %self.component, facility = fac, "librdkafka: {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(component = %self.component, error = %error, reason, "kafka client error");
        self.failing.store(true, Relaxed);
        self.readiness.set(
            &self.component,
            ComponentStatus::Degraded {
                reason: format!("kafka: {error}: {reason}"),
            },
        );
    }
}

type RelayProducer = FutureProducer<RelayContext>;

fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (k, v) in cfg.producer_properties() {
        cc.set(k, v);
    }
    cc
}

/// Builds (and drops) a librdkafka client from the config: unknown or invalid pass-through
/// properties are rejected here, at start, before anything is relayed.
pub fn check_client_config(cfg: &KafkaConfig) -> Result<(), RelayError> {
    cfg.validate()?;
    let _probe: rdkafka::producer::BaseProducer =
        client_config(cfg).create().map_err(RelayError::Client)?;
    Ok(())
}

/// Counters a test or an operator can read while the relay runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub delivered: std::sync::atomic::AtomicU64,
    pub delivery_errors: std::sync::atomic::AtomicU64,
    pub resends: std::sync::atomic::AtomicU64,
}

/// One running relay: drains `outbox` from the cursor named `cfg.cursor_name`.
pub struct KafkaRelay {
    cfg: KafkaConfig,
    outbox: Outbox,
    readiness: Readiness,
    component: String,
    shutdown: CancellationToken,
    stats: Arc<RelayStats>,
    failing: Arc<AtomicBool>,
}

struct InFlight {
    seq: u64,
    event_id: String,
    topic: String,
    /// `None` for events whose topic family is disabled: acknowledged without sending.
    delivery: Option<DeliveryFuture>,
}

enum Step {
    Continue,
    Failed(String),
}

impl KafkaRelay {
    /// Validates the config and builds the librdkafka client configuration (no I/O), so a bad
    /// property fails `tributary serve` at start rather than later.
    pub fn new(
        cfg: KafkaConfig,
        outbox: Outbox,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> Result<Self, RelayError> {
        cfg.validate()?;
        let component = "kafka".to_string();
        let relay = Self {
            cfg,
            outbox,
            readiness,
            component,
            shutdown,
            stats: Arc::default(),
            failing: Arc::default(),
        };
        // Creating a client checks every property name and value; it connects lazily.
        drop(relay.producer()?);
        Ok(relay)
    }

    pub fn with_component_name(mut self, name: &str) -> Self {
        self.component = name.to_string();
        self
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    fn producer(&self) -> Result<RelayProducer, RelayError> {
        client_config(&self.cfg)
            .set_log_level(RDKafkaLogLevel::Warning)
            .create_with_context(RelayContext {
                readiness: self.readiness.clone(),
                component: self.component.clone(),
                failing: self.failing.clone(),
            })
            .map_err(RelayError::Client)
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, RelayError> {
        let mut cc = ClientConfig::new();
        for (k, v) in self.cfg.producer_properties() {
            // Producer-only properties make the admin client complain; it needs only these.
            if k == "bootstrap.servers"
                || k == "client.id"
                || k.starts_with("security.")
                || k.starts_with("sasl.")
                || k.starts_with("ssl.")
            {
                cc.set(k, v);
            }
        }
        cc.create().map_err(RelayError::Client)
    }

    fn set_status(&self, status: ComponentStatus) {
        self.readiness.set(&self.component, status);
    }

    /// Is the cluster reachable (metadata answered within `timeout`)?
    async fn probe(&self, producer: &Arc<RelayProducer>, timeout: Duration) -> Result<(), String> {
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, timeout))
            .await
            .map_err(|e| e.to_string())?
            .map(|_| ())
            .map_err(|e| format!("kafka brokers unreachable: {e}"))
    }

    async fn ensure_topic(
        &self,
        admin: &AdminClient<DefaultClientContext>,
        known: &mut HashSet<String>,
        topic: &str,
    ) -> Result<(), String> {
        if !self.cfg.create_topics || known.contains(topic) {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            self.cfg.topic_partitions,
            TopicReplication::Fixed(self.cfg.topic_replication),
        );
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results =
            tokio::time::timeout(Duration::from_secs(15), admin.create_topics([&new], &opts))
                .await
                .map_err(|_| format!("creating topic {topic}: timed out"))?
                .map_err(|e| format!("creating topic {topic}: {e}"))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("creating topic {t}: {code}")),
            }
        }
        tracing::info!(topic, "kafka topic ready");
        known.insert(topic.to_string());
        Ok(())
    }

    /// Runs until shutdown. Never returns early on a broker problem: it reports, backs off and
    /// retries, with the events kept in the outbox.
    pub async fn run(self) -> Result<(), RelayError> {
        self.set_status(ComponentStatus::Starting);
        let name = self.cfg.cursor_name.clone();
        let mut producer = Arc::new(self.producer()?);
        let admin = self.admin()?;
        let mut known_topics = HashSet::new();

        let acks = self.outbox.ack_recorder(&name)?;
        let start = acks.start();

        match self.probe(&producer, Duration::from_secs(5)).await {
            Ok(()) => self.set_status(ComponentStatus::Ready),
            Err(reason) => {
                self.failing.store(true, Relaxed);
                tracing::warn!(component = %self.component, %reason, "kafka not reachable at start; events wait in the outbox");
                self.set_status(ComponentStatus::Degraded { reason });
            }
        }
        tracing::info!(component = %self.component, cursor = start, "kafka relay started");

        let mut acked = start;
        let mut sent_upto = start;
        let mut pending: VecDeque<InFlight> = VecDeque::new();
        let mut head_rx = self.outbox.subscribe();
        let mut backoff = Duration::from_millis(self.cfg.retry_initial_ms);
        let mut health_tick = tokio::time::interval(Duration::from_secs(5));
        let stall = Duration::from_secs(self.cfg.stall_timeout_secs);
        let mut last_progress = tokio::time::Instant::now();
        let mut restart_producer = false;
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            let before = acked;
            // 1. Fill the pipeline from the outbox.
            let mut step = self
                .fill(
                    &producer,
                    &admin,
                    &mut known_topics,
                    &mut pending,
                    &mut sent_upto,
                )
                .await?;
            // 2. Collect acknowledgements, in outbox order, without waiting.
            if let Step::Continue = step {
                step = self.collect_ready(&mut pending, &mut acked);
            }
            // 3. Wait for the next acknowledgement, new events, a health probe or shutdown.
            let can_send = pending.len() < self.cfg.max_in_flight;
            if let Step::Continue = step {
                if acked == before && !(can_send && self.outbox.head() > sent_upto) {
                    let waiting = !pending.is_empty();
                    let front = pending.front_mut().and_then(|f| f.delivery.as_mut());
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        done = async { match front { Some(f) => f.await.ok(), None => std::future::pending().await } } => {
                            let first = pending.pop_front().expect("front exists");
                            step = self.on_delivery(first, done, &mut acked);
                        }
                        changed = head_rx.changed(), if can_send => {
                            if changed.is_err() {
                                break;
                            }
                        }
                        _ = tokio::time::sleep_until(last_progress + stall), if waiting => {
                            // No acknowledgement for `stall`. Start over with a fresh producer
                            // from the cursor, whether the cluster answers (it came back without
                            // the topic or with other partitions) or not: records left queued in
                            // the old producer would reach a cluster that returns with lost state
                            // before their topics exist again, carrying producer sequence numbers
                            // it never issued. The fresh producer re-creates topics first; only
                            // events already in flight can arrive twice, with the same id.
                            let reachable = self.probe(&producer, Duration::from_secs(3)).await.is_ok();
                            restart_producer = true;
                            step = Step::Failed(if reachable {
                                format!(
                                    "no delivery acknowledgement for {} s from a reachable cluster; restarting the producer",
                                    stall.as_secs()
                                )
                            } else {
                                format!(
                                    "kafka unreachable for {} s; restarting the producer",
                                    stall.as_secs()
                                )
                            });
                        }
                        _ = health_tick.tick() => {
                            if self.failing.load(Relaxed) && pending.is_empty()
                                && self.probe(&producer, Duration::from_secs(3)).await.is_ok()
                            {
                                self.failing.store(false, Relaxed);
                                self.set_status(ComponentStatus::Ready);
                            }
                        }
                    }
                } else {
                    tokio::task::yield_now().await;
                }
            }
            if acked > before || pending.is_empty() {
                last_progress = tokio::time::Instant::now();
            }
            if acked > before {
                acks.record(acked);
                backoff = Duration::from_millis(self.cfg.retry_initial_ms);
                if self.failing.swap(false, Relaxed) {
                    self.set_status(ComponentStatus::Ready);
                }
            }
            if let Step::Failed(reason) = step {
                self.stats.delivery_errors.fetch_add(1, Relaxed);
                tracing::warn!(component = %self.component, %reason, retry_in_ms = backoff.as_millis() as u64, "kafka delivery failed; resending from the last acknowledged event");
                self.failing.store(true, Relaxed);
                self.set_status(ComponentStatus::Degraded { reason });
                // Records still queued behind a failed one would reach the topic before its
                // resend (a later version of a patient's resource before an earlier one): a
                // fresh producer purges them, and everything goes again from the cursor.
                let behind = !pending.is_empty();
                pending.clear();
                sent_upto = acked;
                // A restarted cluster may have lost topics: check them again.
                known_topics.clear();
                self.stats.resends.fetch_add(1, Relaxed);
                if restart_producer || behind || producer.client().fatal_error().is_some() {
                    tracing::warn!(component = %self.component, "creating a new kafka producer");
                    // Dropping the old one purges what it still queued; its drop waits up to
                    // half a second for the purge, so it happens off the async workers.
                    let old = std::mem::replace(&mut producer, Arc::new(self.producer()?));
                    tokio::task::spawn_blocking(move || drop(old));
                    restart_producer = false;
                }
                last_progress = tokio::time::Instant::now() + backoff;
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_millis(self.cfg.retry_max_ms));
            }
        }

        // Shutdown: give in-flight records a moment, record what was acknowledged.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Some(front) = pending.front_mut() {
            let Some(f) = front.delivery.as_mut() else {
                let f = pending.pop_front().expect("front");
                acked = f.seq;
                continue;
            };
            match tokio::time::timeout_at(deadline, f).await {
                Ok(done) => {
                    let done = done.ok();
                    let first = pending.pop_front().expect("front");
                    if let Step::Failed(_) = self.on_delivery(first, done, &mut acked) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        acks.finish(acked).await;
        tracing::info!(component = %self.component, cursor = acked, "kafka relay stopped");
        Ok(())
    }

    async fn fill(
        &self,
        producer: &RelayProducer,
        admin: &AdminClient<DefaultClientContext>,
        known_topics: &mut HashSet<String>,
        pending: &mut VecDeque<InFlight>,
        sent_upto: &mut u64,
    ) -> Result<Step, RelayError> {
        if pending.len() >= self.cfg.max_in_flight || self.outbox.head() <= *sent_upto {
            return Ok(Step::Continue);
        }
        let room = (self.cfg.max_in_flight - pending.len()).min(512);
        for ev in self.outbox.read_after_raw(*sent_upto, room)? {
            let Some(rec) = record::build(&self.cfg, &ev) else {
                pending.push_back(InFlight {
                    seq: ev.seq,
                    event_id: ev.event_id,
                    topic: String::new(),
                    delivery: None,
                });
                *sent_upto = ev.seq;
                continue;
            };
            if let Err(reason) = self.ensure_topic(admin, known_topics, &rec.topic).await {
                return Ok(Step::Failed(reason));
            }
            match send(producer, &rec, &self.shutdown).await {
                Ok(delivery) => {
                    pending.push_back(InFlight {
                        seq: rec.seq,
                        event_id: rec.event_id,
                        topic: rec.topic,
                        delivery: Some(delivery),
                    });
                    *sent_upto = rec.seq;
                }
                Err(e) => {
                    return Ok(Step::Failed(format!(
                        "enqueueing event {} for topic {}: {e}",
                        rec.event_id, rec.topic
                    )))
                }
            }
        }
        Ok(Step::Continue)
    }

    fn on_delivery(
        &self,
        item: InFlight,
        done: Option<OwnedDeliveryResult>,
        acked: &mut u64,
    ) -> Step {
        match done {
            Some(Ok(_)) => {
                *acked = item.seq;
                self.stats.delivered.fetch_add(1, Relaxed);
                Step::Continue
            }
            Some(Err((e, _))) => Step::Failed(format!(
                "event {} to topic {}: {e}",
                item.event_id, item.topic
            )),
            None => Step::Failed(format!(
                "event {} to topic {}: delivery report lost (producer closed)",
                item.event_id, item.topic
            )),
        }
    }

    fn collect_ready(&self, pending: &mut VecDeque<InFlight>, acked: &mut u64) -> Step {
        while let Some(front) = pending.front_mut() {
            let done = match front.delivery.as_mut() {
                None => {
                    let f = pending.pop_front().expect("front");
                    *acked = f.seq;
                    continue;
                }
                Some(f) => match f.now_or_never() {
                    Some(done) => done.ok(),
                    None => break,
                },
            };
            let item = pending.pop_front().expect("front");
            if let Step::Failed(r) = self.on_delivery(item, done, acked) {
                return Step::Failed(r);
            }
        }
        Step::Continue
    }
}

/// Hands one record to librdkafka; when its queue is full, waits briefly and tries again.
async fn send(
    producer: &RelayProducer,
    rec: &KafkaRecord,
    shutdown: &CancellationToken,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let fr = FutureRecord::to(&rec.topic)
            .key(rec.key.as_bytes())
            .payload(&rec.value)
            .headers(headers);
        match producer.send_result(fr) {
            Ok(d) => return Ok(d),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if shutdown.is_cancelled() {
                    return Err(KafkaError::Canceled);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}
