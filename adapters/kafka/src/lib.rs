//! Kafka egress for Tributary: the [`KafkaRelay`] drains the outbox to Kafka topics, one record
//! per event, keyed by patient id, with CloudEvents headers and an idempotent producer.
//!
//! Register it in `serve` with [`KafkaSink`]; configure it with the `[kafka]` section
//! ([`KafkaConfig`]).

pub mod config;
pub mod record;
pub mod relay;
pub mod testing;

pub use config::{KafkaConfig, KafkaConfigError, PayloadMode};
pub use record::KafkaRecord;
pub use relay::{KafkaRelay, RelayError, RelayStats};

use async_trait::async_trait;
use tributary_runtime::{Runtime, Sink};

/// The `[kafka]` relay as a registered [`Sink`].
pub struct KafkaSink {
    config: KafkaConfig,
}

impl KafkaSink {
    /// Validates the section and the librdkafka properties (no I/O); `serve` refuses to start
    /// on an error.
    pub fn new(config: KafkaConfig) -> Result<Self, RelayError> {
        relay::check_client_config(&config)?;
        Ok(Self { config })
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()> {
        rt.metrics.track_outbox_consumer(&self.config.cursor_name);
        let relay = KafkaRelay::new(
            self.config,
            rt.store.outbox().clone(),
            rt.readiness.clone(),
            rt.shutdown.clone(),
        )?;
        relay.run().await?;
        Ok(())
    }
}
