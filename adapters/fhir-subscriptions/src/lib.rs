//! FHIR Subscriptions for Tributary (R4, Subscriptions Backport IG, topic-based).
//!
//! Out: clients create `Subscription` resources through the facade (generic CRUD, which checks
//! scopes and tenant); this crate reads them from the store, matches every committed change
//! against the [`model::TOPICS`] and the subscription's filters, and delivers rest-hook
//! notifications ([`engine`]) or queues them for bound websocket clients ([`ws`]). In:
//! partners' FHIR servers post notifications to
//! `/subscription-hook/<partner>` ([`api`]), which are journaled as FHIR messages.
//!
//! The binary registers [`SubscriptionsSink`] and mounts [`api::router`].

pub mod api;
pub mod bundle;
pub mod config;
pub mod engine;
pub mod model;
pub mod netpolicy;
mod upstream;
pub mod ws;

pub use config::{InboundPartner, SubscriptionsConfig, SubscriptionsConfigError};
pub use engine::{DeadLetter, SubscriptionService};

use async_trait::async_trait;
use std::sync::Arc;
use tributary_runtime::{Runtime, Sink};

/// Builds the shared service (for the sink and the router) from the config.
pub fn service(
    config: SubscriptionsConfig,
    rt: &Runtime,
    default_tenant: &str,
) -> Result<Arc<SubscriptionService>, SubscriptionsConfigError> {
    config.validate()?;
    SubscriptionService::new(config, rt.store.clone(), rt.db.clone(), default_tenant)
}

fn api_state(service: Arc<SubscriptionService>, rt: &Runtime) -> api::ApiState {
    api::ApiState {
        service,
        journal: rt.journal.clone(),
        metrics: rt.metrics.clone(),
    }
}

/// `$status`, `$events`, `$dead-letters` under the configured `path_prefix`. Mount them behind
/// the facade's policy layers, with the tenant header set from the verified token.
pub fn operations_router(service: Arc<SubscriptionService>, rt: &Runtime) -> axum::Router {
    let prefix = service.cfg.path_prefix.clone();
    api::operations_router_at(&prefix, api_state(service, rt))
}

/// `POST <path_prefix>/subscription-hook/<partner>` (partner bearer tokens; no SMART token).
pub fn inbound_router(service: Arc<SubscriptionService>, rt: &Runtime) -> axum::Router {
    let prefix = service.cfg.path_prefix.clone();
    api::inbound_router_at(&prefix, api_state(service, rt))
}

/// `GET <path_prefix>/subscription-ws`: the websocket channel. Clients authenticate with a
/// binding token from `$get-ws-binding-token` (browsers cannot send an `Authorization` header
/// on a websocket), so it is mounted outside the SMART stack.
pub fn websocket_router(service: Arc<SubscriptionService>, rt: &Runtime) -> axum::Router {
    let prefix = service.cfg.path_prefix.clone();
    api::websocket_router_at(&prefix, api_state(service, rt))
}

/// The delivery engine as a registered [`Sink`].
pub struct SubscriptionsSink {
    service: Arc<SubscriptionService>,
}

impl SubscriptionsSink {
    pub fn new(service: Arc<SubscriptionService>) -> Self {
        Self { service }
    }
}

#[async_trait]
impl Sink for SubscriptionsSink {
    fn name(&self) -> &str {
        "subscriptions"
    }

    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()> {
        self.service
            .run(rt.readiness.clone(), rt.shutdown.clone())
            .await?;
        Ok(())
    }
}
