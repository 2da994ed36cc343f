use crate::config::Config;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tributary_runtime::{ComponentStatus, Runtime, Sink, Source};
use tributary_storage::{Db, DbOptions, RetentionPolicy};

/// Opens the data directory and builds the shared runtime.
pub fn open_runtime(config: &Config) -> anyhow::Result<Runtime> {
    let options = DbOptions {
        max_group: config.journal.max_group,
        queue_bound: config.journal.queue_bound,
        sync: true,
        audit_segment_bytes: config.audit.segment_mib << 20,
    };
    let db = Db::open(&config.data_dir, options)
        .with_context(|| format!("opening data directory {}", config.data_dir.display()))?;
    let dedup_ms = (config.journal.dedup_window_secs as i64).saturating_mul(1000);
    Ok(Runtime::embedded(db, dedup_ms))
}

pub fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tributary")
        .build()?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let rt = open_runtime(&config)?;
    rt.readiness.set("store", ComponentStatus::Ready);
    tracing::info!(data_dir = %config.data_dir.display(), "store open");

    let mut tasks = tokio::task::JoinSet::new();
    // The pipeline announces each message's outcome here; MLLP application ACKs listen.
    let processed = tributary_runtime::ProcessedFeed::default();
    let journal_consumers = config
        .mllp
        .routes
        .iter()
        .map(|r| tributary_mllp::MllpRoute::new(r.clone()).consumer())
        .collect();
    tasks.spawn(prune_loop(
        rt.clone(),
        config.journal.retention.clone(),
        journal_consumers,
    ));
    // Opens the audit log now (moving an older layout over and catching its index up), so a
    // log that cannot be opened stops startup instead of failing the first request.
    let audit = rt.audit.clone();
    tokio::task::spawn_blocking(move || audit.open())
        .await?
        .context("opening the audit log")?;
    if config.audit.retention_days > 0 {
        tasks.spawn(audit_retention_loop(rt.clone(), config.audit.clone()));
    }

    // The mapping pipeline: a mapping set that does not load stops startup with every
    // file:line:col error; later bad edits are rejected by hot reload, the old set keeps running.
    let mapping_dir = config.mapping.hl7v2_dir();
    let default_dir = config.mapping.dir == tributary_pipeline::MappingConfig::default().dir;
    let mut registry = None;
    if !mapping_dir.is_dir() && default_dir {
        // No mapping set next to a config-less `tributary serve`: ingest and journal still work;
        // messages wait in `received` until a pipeline with mappings runs.
        tracing::warn!(dir = %mapping_dir.display(), "no mapping set found; mapping pipeline not started");
        rt.readiness.set(
            tributary_pipeline::COMPONENT,
            ComponentStatus::Degraded {
                reason: format!(
                    "no mapping set at {}: messages are journaled and wait in `received` until serve runs with one ([mapping] dir)",
                    mapping_dir.display()
                ),
            },
        );
    } else {
        let loaded = tributary_pipeline::MappingRegistry::load(&mapping_dir).map_err(|e| {
            anyhow::anyhow!("mapping set {} does not load:\n{e}", mapping_dir.display())
        })?;
        let loaded = Arc::new(loaded);
        registry = Some(loaded.clone());
        let pipeline = tributary_pipeline::Pipeline::new(loaded, config.mapping.clone())
            .with_feed(processed.clone());
        rt.readiness
            .set(tributary_pipeline::COMPONENT, ComponentStatus::Starting);
        let pipeline_rt = rt.clone();
        tasks.spawn(async move { pipeline.run(pipeline_rt).await.context("pipeline") });
    }

    // Egress relays and ingress adapters: one line each.
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    if let Some(k) = &config.kafka {
        sinks.push(Box::new(tributary_kafka::KafkaSink::new(k.clone())?));
    }
    if let Some(a) = &config.amqp {
        sinks.extend(tributary_amqp::AmqpEgress::new(a).map(|s| Box::new(s) as Box<dyn Sink>));
        sources.extend(
            tributary_amqp::AmqpIngress::new(a, &config.default_tenant)
                .map(|s| Box::new(s) as Box<dyn Source>),
        );
    }
    // Subscription operations go behind the facade's policy layers (below); the inbound
    // notification hook authenticates partners itself, the websocket channel by binding token.
    let mut subscriptions = None;
    let backups = Arc::new(crate::admin::Backups::new(rt.db.clone(), &config.backup));
    if config.backup.every_secs > 0 {
        let (b, every, stop) = (
            backups.clone(),
            Duration::from_secs(config.backup.every_secs),
            rt.shutdown.clone(),
        );
        tokio::spawn(async move { b.every(every, &stop).await });
    }
    let mut guarded_routes = crate::admin::router(
        Arc::new(rt.clone()),
        registry,
        backups,
        &config.default_tenant,
    );
    let mut extra_routes = axum::Router::new();
    if let Some(s) = &config.subscriptions {
        let service = tributary_subscriptions::service(s.clone(), &rt, &config.default_tenant)?;
        // The facade's revocation list (a file in the data directory, reread when it changes).
        let revocations = Arc::new(tributary_facade::revocation::Revocations::open(
            &config.data_dir,
        ));
        service.set_revocation_check(Arc::new(move |tenant: &str, id: &str| {
            revocations.is_revoked(tenant, id)
        }));
        subscriptions = Some(service.clone());
        guarded_routes = guarded_routes.merge(tributary_subscriptions::operations_router(
            service.clone(),
            &rt,
        ));
        extra_routes = extra_routes.merge(tributary_subscriptions::inbound_router(
            service.clone(),
            &rt,
        ));
        extra_routes = extra_routes.merge(tributary_subscriptions::websocket_router(
            service.clone(),
            &rt,
        ));
        sinks.push(Box::new(tributary_subscriptions::SubscriptionsSink::new(
            service,
        )));
    }
    tasks.spawn(outbox_prune_loop(
        rt.clone(),
        config.outbox.clone(),
        outbox_consumers(&config),
        subscriptions,
    ));
    for route in &config.mllp.routes {
        sinks.push(Box::new(tributary_mllp::MllpRoute::new(route.clone())));
    }
    for sink in sinks {
        tracing::info!(sink = sink.name(), "starting sink");
        tasks.spawn(sink.run(rt.clone()));
    }
    for source in sources {
        tracing::info!(source = source.name(), "starting source");
        tasks.spawn(source.run(rt.clone()));
    }

    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("binding http.listen {}", config.http.listen))?;
    tracing::info!(addr = %config.http.listen, "http listening");
    let mut facade = tributary_facade::Facade::new(
        config.facade.clone(),
        &config.data_dir,
        &config.default_tenant,
    )
    .context("setting up the FHIR facade")?;
    facade.request_timeout = Duration::from_secs(config.http.request_timeout_secs);
    if config.subscriptions.is_some() {
        facade.subscription_topics = tributary_subscriptions::model::TOPICS
            .iter()
            .map(|t| t.url())
            .collect();
    }
    facade.https = config.http.tls.is_some();
    let facade = std::sync::Arc::new(facade);
    facade.backends.report_readiness(&rt.readiness);
    let (f, health_rt) = (facade.clone(), rt.clone());
    tasks.spawn(async move {
        f.backends
            .watch_health(
                &health_rt.readiness,
                &health_rt.metrics,
                &health_rt.shutdown,
            )
            .await;
        Ok(())
    });
    let (f, sweep_rt) = (facade.clone(), rt.clone());
    tasks.spawn(async move {
        f.exports.keep_swept(&sweep_rt.shutdown).await;
        Ok(())
    });
    if !config.facade.auth.jwks_url.is_empty() {
        // Refresh the identity provider's keys in the background; the cached copy serves meanwhile.
        let f = facade.clone();
        tokio::spawn(async move { f.auth.refresh_jwks().await });
    }
    let state = tributary_facade::AppState {
        rt: std::sync::Arc::new(rt.clone()),
        facade,
    };
    // Every route, the partner-authenticated inbound hook included, gets the body limit.
    let app = tributary_facade::app_with(state, guarded_routes)
        .merge(extra_routes)
        .layer(axum::extract::DefaultBodyLimit::max(
            config.http.max_body_bytes,
        ));
    let http_shutdown = rt.shutdown.clone();
    let limits = tributary_runtime::http_server::Limits {
        idle_timeout: Duration::from_secs(config.http.idle_timeout_secs),
        max_connections: config.http.max_connections,
    };
    let metrics = rt.metrics.clone();
    let tls = match &config.http.tls {
        Some(t) => Some(
            tributary_runtime::tls::ReloadingAcceptor::new(t.clone())
                .context("setting up TLS for http (http.tls)")?,
        ),
        None => None,
    };
    tasks.spawn(async move {
        tributary_runtime::http_server::serve(listener, app, limits, tls, metrics, http_shutdown)
            .await;
        Ok(())
    });
    rt.readiness.set("http", ComponentStatus::Ready);

    // Ingress sources, one line per adapter.
    let mllp_budget = tributary_mllp::codec::InboundBudget::new(config.mllp.max_buffered_bytes);
    for listener in config.mllp.effective_listeners() {
        spawn_source(
            &mut tasks,
            &rt,
            tributary_mllp::MllpSource::new(listener, &config.default_tenant)
                .with_processed_feed(processed.clone())
                .with_inbound_budget(mllp_budget.clone()),
        );
    }

    let shutdown = rt.shutdown.clone();
    // A component that ends before a signal asked it to is a failure, whatever it returned:
    // the exit status must tell a supervisor (`Restart=on-failure`) to start us again.
    let mut failed = tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("shutdown requested");
            false
        }
        Some(res) = tasks.join_next() => {
            component_ended(res);
            true
        }
    };
    shutdown.cancel();
    let drain = async {
        let mut failed = false;
        while let Some(res) = tasks.join_next().await {
            if matches!(res, Ok(Err(_)) | Err(_)) {
                failed = true;
                component_ended(res);
            }
        }
        failed
    };
    match tokio::time::timeout(Duration::from_secs(30), drain).await {
        Ok(f) => failed |= f,
        Err(_) => {
            tracing::warn!("components did not stop within 30 s; exiting anyway");
            failed = true;
        }
    }
    drop(rt);
    if failed {
        anyhow::bail!("stopped after a component failed (see the log above)");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

fn component_ended(res: Result<anyhow::Result<()>, tokio::task::JoinError>) {
    match res {
        Ok(Ok(())) => tracing::error!("component stopped unexpectedly"),
        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "component stopped"),
        Err(e) if e.is_panic() => tracing::error!("component panicked"),
        Err(_) => tracing::error!("component was cancelled"),
    }
}

fn spawn_source(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    rt: &Runtime,
    source: impl tributary_runtime::Source,
) {
    let rt = rt.clone();
    tasks.spawn(Box::new(source).run(rt));
}

/// Journal retention; `consumers` are the journal cursors (outbound routes) that must pass a
/// message before it goes.
async fn prune_loop(
    rt: Runtime,
    cfg: crate::config::RetentionConfig,
    consumers: Vec<String>,
) -> anyhow::Result<()> {
    let policy = RetentionPolicy {
        delivered_max_age_ms: (cfg.delivered_max_age_hours as i64).saturating_mul(3_600_000),
        max_payload_bytes: (cfg.max_payload_bytes > 0).then_some(cfg.max_payload_bytes),
        consumers,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.prune_interval_secs));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match rt
            .journal
            .prune(&policy, tributary_core::now_millis())
            .await
        {
            Ok(s) => tracing::info!(
                pruned = s.pruned,
                bytes = s.bytes_freed,
                kept_for_attention = s.kept_for_attention,
                held_for_replay = s.held_for_replay,
                "journal retention"
            ),
            Err(e) => tracing::warn!(error = %e, "journal retention failed"),
        }
    }
}

/// Prunes audit records older than `audit.retention_days`, keeping the chain verifiable.
async fn audit_retention_loop(rt: Runtime, cfg: crate::config::AuditConfig) -> anyhow::Result<()> {
    let max_age_ms = (cfg.retention_days as i64).saturating_mul(86_400_000);
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.prune_interval_secs));
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = tributary_core::now_millis();
        match rt
            .audit
            .prune_before(now.saturating_sub(max_age_ms), now)
            .await
        {
            Ok(s) if s.pruned > 0 => tracing::info!(
                pruned = s.pruned,
                anchor = s.anchor.unwrap_or(0),
                "audit retention"
            ),
            Ok(_) => {}
            // A broken chain is never pruned: the evidence stays until someone looks.
            Err(e) => tracing::error!(error = %e, "audit retention failed"),
        }
    }
}

/// The relay cursors every delivered event must have passed before it may be pruned.
fn outbox_consumers(config: &Config) -> Vec<String> {
    config
        .relay_cursors()
        .into_iter()
        .map(|(_, name)| name.to_string())
        .collect()
}

/// Outbox retention: every `prune_interval_secs`, events older than `max_age_secs` that every
/// relay cursor and every active Subscription's delivery cursor has passed are removed (with
/// the Subscriptions' event-number index entries for them). Off with `max_age_secs = 0` or
/// with neither a relay nor `[subscriptions]` (a relay added later starts from the beginning).
async fn outbox_prune_loop(
    rt: Runtime,
    cfg: crate::config::OutboxConfig,
    relays: Vec<String>,
    subscriptions: Option<Arc<tributary_subscriptions::SubscriptionService>>,
) -> anyhow::Result<()> {
    if cfg.max_age_secs == 0 || (relays.is_empty() && subscriptions.is_none()) {
        tracing::info!(
            "outbox pruning off (max_age_secs = 0, or neither a relay nor subscriptions)"
        );
        // A finished task stops `serve`: wait for shutdown like every other component.
        rt.shutdown.cancelled().await;
        return Ok(());
    }
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.prune_interval_secs));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let outbox = rt.store.outbox();
        let floor = (|| -> tributary_storage::Result<Option<u64>> {
            let mut upto = u64::MAX;
            for r in &relays {
                upto = upto.min(outbox.cursor(r)?);
            }
            if let Some(s) = &subscriptions {
                match s.retention_floor()? {
                    Some(f) => upto = upto.min(f),
                    // Not yet known which subscriptions are active: prune nothing.
                    None => return Ok(None),
                }
            }
            Ok(Some(upto))
        })();
        let upto = match floor {
            Ok(Some(upto)) => upto,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "outbox retention failed");
                continue;
            }
        };
        let before = tributary_core::now_millis()
            .saturating_sub((cfg.max_age_secs as i64).saturating_mul(1000));
        match outbox.prune_through(upto, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "outbox retention"),
            Err(e) => tracing::warn!(error = %e, "outbox retention failed"),
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
