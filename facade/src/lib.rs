//! The gateway facade: `fn app(state) -> Router`.
//!
//! Operational endpoints (`/health`, `/ready`), discovery (`/.well-known/smart-configuration`,
//! `/.well-known/jwks.json`), and the FHIR R4 API at `/fhir` behind the policy stack of
//! [`pipeline`]: request id → audit → authenticate → authorize → rate limit → handler (the
//! store's, or a backend FHIR server's through [`backend::route`]).

pub mod audit;
pub mod auth;
pub mod backend;
mod capability;
pub mod config;
pub mod error;
mod everything;
pub mod export;
pub mod fhirpatch;
pub mod keys;
mod lastn;
mod matching;
pub mod patch;
pub mod pipeline;
pub mod policy;
pub mod ratelimit;
mod rest;
pub mod revocation;
pub mod scopes;
mod search;
pub mod subscription;
mod subset;
mod transaction;

use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tributary_runtime::Runtime;

pub use auth::{Authenticator, IssueRequest, Principal};
pub use config::FacadeConfig;
pub use error::ApiError;
pub use keys::LocalSigningKey;

#[derive(Debug, thiserror::Error)]
pub enum FacadeError {
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("authentication setup: {0}")]
    Auth(String),
    #[error(transparent)]
    Backend(#[from] backend::BackendSetupError),
}

/// The facade's own services, built once at start.
pub struct Facade {
    pub cfg: FacadeConfig,
    pub auth: Authenticator,
    pub limiter: ratelimit::RateLimiter,
    pub backends: backend::Backends,
    pub local_key: Option<LocalSigningKey>,
    /// First 12 hex digits of the SHA-256 of the effective `[facade]` config: recorded in every
    /// audit record, so a reviewer knows which policy decided.
    pub policy_version: String,
    /// Longest a request may take (`http.request_timeout_secs`): past it the client gets 503
    /// (504 when a backend FHIR server was being called) and the request is abandoned.
    pub request_timeout: std::time::Duration,
    /// Whether the listener serves HTTPS (`[http.tls]`): the links the facade writes (paging,
    /// `fullUrl`, SMART endpoints) then say `https` when `base_url` is not configured.
    pub https: bool,
    /// When this configuration took effect (RFC 3339): the CapabilityStatement's `date`, since
    /// what it declares (routes to backends, conditional delete) depends on the configuration.
    pub configured_at: String,
    /// Canonical URLs of the SubscriptionTopics served beside the facade (`[subscriptions]`),
    /// announced in the CapabilityStatement with the Subscription operations; empty: none.
    pub subscription_topics: Vec<String>,
    /// Bulk Data export jobs (`$export`).
    pub exports: export::Exports,
}

impl Facade {
    pub fn new(
        cfg: FacadeConfig,
        data_dir: &Path,
        default_tenant: &str,
    ) -> Result<Self, FacadeError> {
        let local_key = if cfg.auth.local_key {
            Some(LocalSigningKey::load_or_create(data_dir)?)
        } else {
            None
        };
        let revocations = Arc::new(revocation::Revocations::open(data_dir));
        let auth = Authenticator::new(
            cfg.auth.clone(),
            data_dir,
            default_tenant,
            local_key.as_ref(),
            revocations,
        )
        .map_err(FacadeError::Auth)?;
        let digest = Sha256::digest(serde_json::to_vec(&cfg).unwrap_or_default());
        Ok(Self {
            limiter: ratelimit::RateLimiter::new(cfg.rate_limit.clone()),
            backends: backend::Backends::new(&cfg.backends)?,
            policy_version: hex::encode(&digest[..6]),
            request_timeout: std::time::Duration::from_secs(30),
            https: false,
            configured_at: tributary_core::format_rfc3339_millis(tributary_core::now_millis()),
            subscription_topics: Vec::new(),
            exports: export::Exports::open(data_dir, cfg.export.clone()),
            auth,
            local_key,
            cfg,
        })
    }
}

/// Everything the handlers need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Behind an `Arc`: axum clones the state for every middleware layer of every request.
    pub rt: Arc<Runtime>,
    pub facade: Arc<Facade>,
}

/// The FHIR routes alone, without any policy layer.
fn fhir_routes() -> Router<AppState> {
    Router::new()
        .route("/fhir", post(transaction::transaction))
        .route("/fhir/", post(transaction::transaction))
        .route("/fhir/metadata", get(capability::metadata))
        .route("/fhir/$export", get(export::kick_off))
        .route("/fhir/Patient/$export", get(export::kick_off))
        .route("/fhir/Patient/$match", post(matching::patient_match))
        .route("/fhir/Observation/$lastn", get(lastn::lastn))
        .route("/fhir/Group/{id}/$export", get(export::kick_off))
        .route(
            "/fhir/$export-status/{job}",
            get(export::status).delete(export::status),
        )
        .route("/fhir/$export-file/{job}/{file}", get(export::file))
        .route("/fhir/AuditEvent", get(rest::audit_events))
        .route(
            "/fhir/{rtype}",
            get(search::search_get)
                .post(rest::create)
                .put(rest::conditional_update)
                .delete(rest::conditional_delete),
        )
        .route("/fhir/{rtype}/_search", post(search::search_post))
        .route("/fhir/{rtype}/_history", get(rest::history_type))
        .route(
            "/fhir/{rtype}/{id}",
            get(rest::read)
                .put(rest::update)
                .delete(rest::delete)
                .patch(rest::patch),
        )
        .route("/fhir/{rtype}/{id}/{op}", get(rest::instance_op))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(rest::vread))
        .route("/admin/consent/{id}/revoke", post(rest::revoke_consent))
        .route("/admin/audit/verify", get(rest::verify_audit))
        .route("/admin/mapping/report", get(rest::mapping_report))
        .fallback(rest::not_found)
}

pub fn app(state: AppState) -> Router {
    app_with(state, Router::new())
}

/// [`app`] plus routes served by other components (e.g. Subscription `$status`/`$events`),
/// mounted inside the same policy stack: they are authenticated, authorized as FHIR
/// interactions, rate limited and audited like every other FHIR request, and see the caller's
/// verified tenant in `x-tributary-tenant` (never a client-supplied value).
pub fn app_with(state: AppState, inner: Router) -> Router {
    // Instance operations served by other components (`Subscription/<id>/$status`, …) are only
    // reached when the caller may read that very resource (tenant, scopes, patient context).
    let inner = inner.layer(from_fn_with_state(state.clone(), pipeline::instance_guard));
    let policy = fhir_routes()
        .with_state(state.clone())
        .merge(inner)
        .layer(from_fn_with_state(state.clone(), pipeline::policy));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/.well-known/smart-configuration",
            get(capability::smart_configuration),
        )
        .route(
            "/fhir/.well-known/smart-configuration",
            get(capability::smart_configuration),
        )
        .route("/.well-known/jwks.json", get(capability::jwks))
        .with_state(state)
        .merge(policy)
}

/// The same handlers with no policy at all, every request acting as a `system/*.cruds` client
/// of the default tenant. Only for measuring the pipeline's cost (`examples/perf_server.rs`);
/// never served by `tributary serve`.
pub fn app_without_pipeline(state: AppState, tenant: &str) -> Router {
    let principal = Arc::new(Principal {
        client_id: "perf-baseline".into(),
        user: None,
        tenant: tenant.into(),
        role: None,
        role_kind: None,
        scopes: scopes::ScopeSet::parse("system/*.cruds"),
        scope_text: "system/*.cruds".into(),
        patient: None,
        grant: None,
        jti: None,
        exp: i64::MAX,
    });
    let access = policy::Access {
        principal: principal.clone(),
        break_glass: false,
    };
    fhir_routes()
        .layer(from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                let access = access.clone();
                let principal = principal.clone();
                async move {
                    let path = req
                        .uri()
                        .path()
                        .strip_prefix("/fhir")
                        .unwrap_or("")
                        .to_string();
                    let fhir = policy::classify(req.method(), &path, req.uri().query());
                    req.extensions_mut().insert(fhir);
                    req.extensions_mut().insert(audit::AuditSlot::default());
                    req.extensions_mut().insert(principal);
                    req.extensions_mut().insert(access);
                    next.run(req).await
                }
            },
        ))
        .with_state(state)
}

/// Liveness: the process is up and its HTTP loop answers.
async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: the store is open and every configured component serves; `degraded` (still 200)
/// when a downstream is unreachable and work waits for it.
async fn ready(State(state): State<AppState>) -> Response {
    let components = state.rt.readiness.snapshot();
    let serving = state.rt.readiness.all_serving();
    let (code, status) = if !serving {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    } else if state.rt.readiness.any_degraded() {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ready")
    };
    let body = json!({
        "status": status,
        "components": components,
        "journal": { "head_seq": state.rt.journal.stats().head_seq },
    });
    (code, Json(body)).into_response()
}

/// Prometheus text format: what the components counted, plus store positions read now.
/// Public like `/ready` (no PHI: names, outcomes, status codes and counts only).
async fn metrics(State(state): State<AppState>) -> Response {
    use tributary_runtime::Sample;
    let rt = &state.rt;
    let gauge = |name, labels: Vec<(&'static str, String)>, value: f64| Sample {
        name,
        labels,
        value,
    };
    let outbox = rt.store.outbox();
    let head = outbox.head();
    let commits = rt.db.committer().stats();
    let load =
        |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let mut samples = vec![
        gauge(
            "tributary_journal_head_seq",
            vec![],
            rt.journal.stats().head_seq as f64,
        ),
        gauge("tributary_outbox_head_seq", vec![], head as f64),
        gauge(
            "tributary_store_disk_bytes",
            vec![],
            rt.db.disk_space() as f64,
        ),
        gauge(
            "tributary_store_commits_total",
            vec![],
            load(&commits.groups),
        ),
        gauge(
            "tributary_store_commit_jobs_total",
            vec![],
            load(&commits.jobs),
        ),
        gauge(
            "tributary_store_slow_commits_total",
            vec![],
            load(&commits.slow),
        ),
    ];
    if let Some(audit) = rt.audit.commit_stats() {
        samples.extend([
            gauge("tributary_audit_commits_total", vec![], load(&audit.groups)),
            gauge("tributary_audit_records_total", vec![], load(&audit.jobs)),
            gauge(
                "tributary_audit_slow_commits_total",
                vec![],
                load(&audit.slow),
            ),
        ]);
    }
    for relay in rt.metrics.outbox_consumers() {
        if let Ok(cursor) = outbox.cursor(&relay) {
            samples.push(gauge(
                "tributary_outbox_lag_events",
                vec![("relay", relay)],
                head.saturating_sub(cursor) as f64,
            ));
        }
    }
    for (component, status) in rt.readiness.snapshot() {
        let degraded = matches!(status, tributary_runtime::ComponentStatus::Degraded { .. });
        samples.push(gauge(
            "tributary_component_ready",
            vec![("component", component.clone())],
            if status.serving() { 1.0 } else { 0.0 },
        ));
        samples.push(gauge(
            "tributary_component_degraded",
            vec![("component", component)],
            if degraded { 1.0 } else { 0.0 },
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        rt.metrics.render(samples),
    )
        .into_response()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod properties;
