use crate::config::Config;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_runtime::{ComponentStatus, Readiness, Runtime, Sink, Source};
use tributary_storage::{AuditLog, Db, DbOptions, FjallJournal, FjallStore, RetentionPolicy};

/// Opens the data directory and builds the shared runtime.
pub fn open_runtime(config: &Config) -> anyhow::Result<Runtime> {
    let options = DbOptions {
        max_group: config.journal.max_group,
        queue_bound: config.journal.queue_bound,
        sync: true,
    };
    let db = Db::open(&config.data_dir, options)
        .with_context(|| format!("opening data directory {}", config.data_dir.display()))?;
    let dedup_ms = (config.journal.dedup_window_secs as i64).saturating_mul(1000);
    Ok(Runtime {
        journal: Arc::new(FjallJournal::new(db.clone(), dedup_ms)),
        store: Arc::new(FjallStore::new(db.clone())),
        audit: AuditLog::new(db.clone()),
        db,
        readiness: Readiness::default(),
        shutdown: CancellationToken::new(),
    })
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
    tasks.spawn(prune_loop(rt.clone(), config.journal.retention.clone()));

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
    let mut extra_routes = axum::Router::new();
    if let Some(s) = &config.subscriptions {
        let service = tributary_subscriptions::service(s.clone(), &rt, &config.default_tenant)?;
        extra_routes = extra_routes.merge(tributary_subscriptions::router(service.clone(), &rt));
        sinks.push(Box::new(tributary_subscriptions::SubscriptionsSink::new(
            service,
        )));
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
    let app =
        tributary_facade::app(tributary_facade::AppState { rt: rt.clone() }).merge(extra_routes);
    let http_shutdown = rt.shutdown.clone();
    tasks.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
            .context("http server")
    });
    rt.readiness.set("http", ComponentStatus::Ready);

    let shutdown = rt.shutdown.clone();
    tokio::select! {
        _ = wait_for_signal() => tracing::info!("shutdown requested"),
        Some(res) = tasks.join_next() => {
            if let Ok(Err(e)) = res {
                tracing::error!(error = %format!("{e:#}"), "component stopped");
            }
        }
    }
    shutdown.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!("components did not stop within 30 s; exiting anyway");
    }
    drop(rt);
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn prune_loop(rt: Runtime, cfg: crate::config::RetentionConfig) -> anyhow::Result<()> {
    let policy = RetentionPolicy {
        delivered_max_age_ms: (cfg.delivered_max_age_hours as i64).saturating_mul(3_600_000),
        max_payload_bytes: (cfg.max_payload_bytes > 0).then_some(cfg.max_payload_bytes),
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
                "journal retention"
            ),
            Err(e) => tracing::warn!(error = %e, "journal retention failed"),
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
