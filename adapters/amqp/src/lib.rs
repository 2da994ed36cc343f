//! AMQP 0-9-1 (RabbitMQ) for Tributary:
//! - [`AmqpSink`]: every outbox event published to a topic exchange, routing key
//!   `<tenant>.<ResourceType>.<event>`, persistent, with publisher confirms;
//! - [`AmqpSource`]: HL7 v2 / FHIR messages consumed from a queue, journaled before the ack.
//!
//! Configured by the optional `[amqp]` section ([`AmqpConfig`]); registered in `serve` through
//! [`AmqpEgress`] and [`AmqpIngress`].

pub mod config;
pub mod sink;
pub mod source;

pub use config::{AmqpConfig, AmqpConfigError, AmqpPayload, AmqpSinkConfig, AmqpSourceConfig};
pub use sink::AmqpSink;
pub use source::AmqpSource;

use async_trait::async_trait;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_runtime::{ComponentStatus, Readiness, Runtime, Sink, Source};

/// After a broker failure (sink or source): reports `reason` in `/ready`, waits `backoff` and
/// doubles it for the next failure, up to `retry_max_ms`. `false` when shutdown came first.
pub(crate) async fn wait_to_retry(
    cfg: &AmqpConfig,
    readiness: &Readiness,
    component: &str,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
    reason: String,
) -> bool {
    readiness.set(component, ComponentStatus::Degraded { reason });
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_millis(cfg.retry_max_ms));
    true
}

/// `[amqp.sink]` as a registered [`Sink`].
pub struct AmqpEgress {
    config: AmqpConfig,
}

impl AmqpEgress {
    /// `None` when `[amqp.sink]` is absent.
    pub fn new(config: &AmqpConfig) -> Option<Self> {
        config.sink.as_ref()?;
        Some(Self {
            config: config.clone(),
        })
    }
}

#[async_trait]
impl Sink for AmqpEgress {
    fn name(&self) -> &str {
        "amqp-sink"
    }

    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()> {
        if let Some(sink) = &self.config.sink {
            rt.metrics.track_outbox_consumer(&sink.cursor_name);
        }
        if let Some(s) = AmqpSink::new(
            self.config,
            rt.store.outbox().clone(),
            rt.readiness.clone(),
            rt.shutdown.clone(),
        ) {
            s.run().await?;
        }
        Ok(())
    }
}

/// `[amqp.source]` as a registered [`Source`].
pub struct AmqpIngress {
    config: AmqpConfig,
    default_tenant: String,
}

impl AmqpIngress {
    /// `None` when `[amqp.source]` is absent.
    pub fn new(config: &AmqpConfig, default_tenant: &str) -> Option<Self> {
        config.source.as_ref()?;
        Some(Self {
            config: config.clone(),
            default_tenant: default_tenant.to_string(),
        })
    }
}

#[async_trait]
impl Source for AmqpIngress {
    fn name(&self) -> &str {
        "amqp-source"
    }

    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()> {
        if let Some(s) = AmqpSource::new(
            self.config,
            &self.default_tenant,
            rt.journal.clone(),
            rt.readiness.clone(),
            rt.shutdown.clone(),
        ) {
            s.with_metrics(rt.metrics.clone())
                .with_audit(rt.audit.clone())
                .run()
                .await?;
        }
        Ok(())
    }
}
