//! Serves the same FHIR handlers twice over one durable store, for measuring the policy
//! pipeline's cost in one run (docs/PERFORMANCE.md, "FHIR facade"):
//!
//! - `FULL` address: the real `app()` — JWT verification, SMART scopes, rate limit and durable,
//!   hash-chained audit before every response;
//! - `BARE` address: `app_without_pipeline()` — the same handlers with no policy at all.
//!
//! ```text
//! cargo run --release -p tributary-facade --example perf_server -- DATA_DIR 127.0.0.1:18090 127.0.0.1:18091
//! ```
//! `PERF_SYNC=0` turns fsync off (to measure the CPU cost alone). It seeds `Patient/perf-1`, prints a token on stdout (last line) and serves until killed.

use std::sync::Arc;
use tributary_facade::config::LimitOverride;
use tributary_facade::{app, app_without_pipeline, AppState, Facade, FacadeConfig, IssueRequest};
use tributary_runtime::Runtime;
/// The allocator `tributary serve` runs with, so the figures match the shipped binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use tributary_storage::{Db, DbOptions, ResourceWrite, StoreTransaction};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, full, bare) = (&args[1], &args[2], &args[3]);
    // PERF_SYNC=0 turns the fsync off, to separate the disk's share of the cost from the CPU's.
    let sync = std::env::var("PERF_SYNC").map(|v| v != "0").unwrap_or(true);
    let db = Db::open(
        dir,
        DbOptions {
            sync,
            ..DbOptions::default()
        },
    )
    .expect("data dir");
    let rt = Runtime::embedded(db, 0);
    let mut cfg = FacadeConfig::default();
    // The load generator is one client: give it a budget the run cannot exhaust, so every
    // request still goes through the bucket arithmetic but none is refused.
    cfg.rate_limit.overrides.insert(
        "default/perf".into(),
        LimitOverride {
            burst: 100_000_000,
            per_sec: 100_000_000,
        },
    );
    cfg.rate_limit.user_burst = 100_000_000;
    cfg.rate_limit.user_per_sec = 100_000_000;
    let facade = Arc::new(Facade::new(cfg, std::path::Path::new(dir), "default").expect("facade"));
    let patient = serde_json::json!({"resourceType": "Patient", "id": "perf-1", "gender": "female", "birthDate": "1980-01-01"});
    rt.store
        .commit(StoreTransaction {
            tenant: "default".into(),
            writes: vec![ResourceWrite::upsert("Patient", "perf-1", patient)],
            ..Default::default()
        })
        .await
        .expect("seed");
    let token = tributary_facade::auth::issue(
        facade.local_key.as_ref().expect("local key"),
        &IssueRequest {
            client_id: "perf".into(),
            scope: "patient/*.rs".into(),
            patient: Some("perf-1".into()),
            ttl_secs: 86_400,
            issuer: "tributary".into(),
            audience: "tributary".into(),
            ..Default::default()
        },
    )
    .expect("token");
    let audit = rt.audit.clone();
    // The audit log's group-commit figures on stderr every 5 s: records per fdatasync.
    tokio::spawn(async move {
        let mut last = (0, 0, 0);
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let Some(s) = audit.commit_stats() else {
                continue;
            };
            let load =
                |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            let now = (load(&s.groups), load(&s.jobs), load(&s.slow));
            if now.0 > last.0 {
                eprintln!(
                    "audit commits: {} groups, {:.1} records per group, {} took >= 10 ms",
                    now.0 - last.0,
                    (now.1 - last.1) as f64 / (now.0 - last.0) as f64,
                    now.2 - last.2
                );
            }
            last = now;
        }
    });
    let state = AppState {
        rt: Arc::new(rt),
        facade,
    };
    let full_app = app(state.clone());
    let bare_app = app_without_pipeline(state, "default");
    let l1 = tokio::net::TcpListener::bind(full)
        .await
        .expect("bind full");
    let l2 = tokio::net::TcpListener::bind(bare)
        .await
        .expect("bind bare");
    println!("{token}");
    // The listener `tributary serve` runs (connection bounds included), for both.
    let limits = tributary_runtime::http_server::Limits {
        idle_timeout: std::time::Duration::from_secs(60),
        max_connections: 10_000,
    };
    let never = tokio_util::sync::CancellationToken::new();
    let stop = never.clone();
    let a = tokio::spawn(tributary_runtime::http_server::serve(
        l1,
        full_app,
        limits,
        None,
        Default::default(),
        never,
    ));
    let b = tokio::spawn(tributary_runtime::http_server::serve(
        l2,
        bare_app,
        limits,
        None,
        Default::default(),
        stop,
    ));
    let _ = tokio::join!(a, b);
}
