//! The policy stack, one stage each, outermost first:
//! request id → audit (records whatever happens inside, durably, before the response leaves)
//! → authenticate → authorize → rate limit → backend routing → handler.
//!
//! The audit stage sits outside authentication so that refused requests (401/403/429) are
//! recorded too; the record is built from what the inner stages wrote into the [`AuditSlot`].
//!
//! The stages run inside one middleware ([`policy`]) rather than one `from_fn` layer each: every
//! layer clones the service below it and boxes a future per request, which cost more CPU than
//! the checks themselves (see docs/PERFORMANCE.md, "FHIR facade").

use crate::audit::AuditSlot;
use crate::error::{ApiError, ErrorKind};
use crate::policy::{classify, FhirRequest, Interaction};
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const BREAK_GLASS: HeaderName = HeaderName::from_static("x-break-glass");

fn acceptable_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// What a policy stage decided: go on with the (annotated) request, or answer now.
pub(crate) enum Step<T = Request> {
    Next(T),
    Answer(Response),
}

/// The whole policy stack as one middleware (see the module documentation for the order).
pub async fn policy(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // Takes a well-formed `X-Request-Id` from the caller or makes one; echoes it on the response
    // and opens the request's tracing span (ids only).
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable_request_id(v))
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let header = HeaderValue::from_str(&id).ok();
    let span = tracing::debug_span!("request", request_id = %id, method = %req.method());
    let mut res = audit(&st, id, req, next).instrument(span).await;
    if let Some(v) = header {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    res
}

/// Authenticate → authorize → rate limit → backend or handler.
async fn guarded(st: &AppState, req: Request, next: Next) -> Response {
    let req = match authenticate(st, req).await {
        Step::Next(r) => r,
        Step::Answer(res) => return res,
    };
    let req = match authorize(st, req) {
        Step::Next(r) => r,
        Step::Answer(res) => return res,
    };
    let (req, quota) = match rate_limit(st, req) {
        Step::Next(r) => r,
        Step::Answer(res) => return res,
    };
    let mut res = match crate::backend::route(st, req).await {
        Step::Next(req) => next.run(req).await,
        Step::Answer(res) => res,
    };
    if let Some(q) = quota {
        quota_headers(&mut res, &q);
    }
    res
}

/// Classifies the request, runs everything inside (at most `http.request_timeout_secs`: then 503,
/// or 504 when a backend was being called), then appends the audit record and waits for it to be
/// durable. If the audit log cannot be written, the client gets 500, never data.
async fn audit(st: &AppState, request_id: String, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let fhir = match path.strip_prefix("/fhir") {
        Some(rest) => classify(req.method(), rest, req.uri().query()),
        None => FhirRequest {
            interaction: if path == "/admin/audit/verify" {
                Interaction::AuditQuery
            } else if path.starts_with("/admin/") {
                Interaction::Admin
            } else {
                Interaction::Unknown
            },
            resource_type: None,
            id: None,
            params: Vec::new(),
        },
    };
    let interaction = fhir.interaction.name();
    let slot = AuditSlot::default();
    slot.update(|d| {
        d.request_id = request_id;
        d.time_ms = tributary_core::now_millis();
        d.interaction = fhir.interaction.name();
        d.resource_type = fhir
            .resource_type
            .clone()
            .filter(|t| crate::policy::valid_type(t));
        d.resource_id = fhir.id.clone().filter(|i| crate::policy::valid_id(i));
        d.patient = fhir.target_patient().filter(|p| crate::policy::valid_id(p));
    });
    req.extensions_mut().insert(slot.clone());
    req.extensions_mut().insert(fhir);
    let limit = st.facade.request_timeout;
    let res = match tokio::time::timeout(limit, guarded(st, req, next)).await {
        Ok(res) => res,
        Err(_) => {
            // The inner future is dropped here: whatever it was doing is abandoned. A write that
            // had already reached the committer may still commit (the client learns the outcome
            // with a read); the audit record below says the request timed out.
            let backend = slot.snapshot().backend;
            tracing::warn!(
                timeout_secs = limit.as_secs(),
                backend = backend.as_deref().unwrap_or(""),
                "request exceeded http.request_timeout_secs"
            );
            match backend {
                Some(name) => {
                    st.facade.backends.timed_out(&name, &st.rt.readiness);
                    ApiError::BackendTimeout(format!(
                        "backend {name} did not answer within the request timeout"
                    ))
                }
                None => ApiError::Timeout(format!(
                    "request not completed within {} s",
                    limit.as_secs()
                )),
            }
            .into_response()
        }
    };
    let status = res.status().as_u16();
    // An operation served by another component (a Subscription's `$events`) says whose data it
    // handed out; those patients get disclosure records like a search's.
    if let Some(seen) = res
        .extensions()
        .get::<tributary_runtime::PatientsDisclosed>()
    {
        slot.disclose(seen.into());
    }
    if let Some(ErrorKind(kind)) = res.extensions().get::<ErrorKind>() {
        let kind = *kind;
        slot.update(|d| d.detail = Some(kind));
    }
    let latency_us = started.elapsed().as_micros() as u64;
    // One group-commit job: a bundle's entry records are durable with the request's.
    let records = slot
        .take()
        .into_records(status, latency_us, &st.facade.policy_version);
    let res = match st.rt.audit.append_prepared(records).await {
        Ok(_) => res,
        Err(e) => {
            tracing::error!(error = %e, "audit append failed; refusing to answer without a record");
            ApiError::Internal("audit log unavailable".into()).into_response()
        }
    };
    let metrics = &st.rt.metrics;
    metrics.inc(
        "tributary_http_requests_total",
        &[
            ("interaction", interaction),
            ("status", res.status().as_str()),
        ],
    );
    metrics.observe(
        "tributary_http_request_duration_seconds",
        &[("interaction", interaction)],
        started.elapsed().as_micros() as u64,
    );
    res
}

fn bearer(req: &Request) -> Option<&str> {
    let v = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Verifies the bearer token (public endpoints excepted) and puts the [`Principal`] in the
/// request.
///
/// [`Principal`]: crate::auth::Principal
async fn authenticate(st: &AppState, mut req: Request) -> Step {
    let interaction = req.extensions().get::<FhirRequest>().map(|f| f.interaction);
    if interaction == Some(Interaction::Capabilities) {
        return Step::Next(req);
    }
    let Some(token) = bearer(&req) else {
        return Step::Answer(
            ApiError::Unauthorized("bearer token required".into()).into_response(),
        );
    };
    // A state change — a FHIR write, or an admin POST (replay, consent revocation) — is
    // introspected anew, never answered from the cache.
    let write = req.extensions().get::<FhirRequest>().is_some_and(|f| {
        f.interaction.is_write()
            || (f.interaction == Interaction::Admin && req.method() != axum::http::Method::GET)
    });
    let principal = match st.facade.auth.authenticate(token, write).await {
        Ok(p) => p,
        Err(e) => return Step::Answer(e.into_response()),
    };
    if let Some(slot) = req.extensions().get::<AuditSlot>() {
        slot.update(|d| {
            d.tenant = Some(principal.tenant.clone());
            d.client = Some(principal.client_id.clone());
            d.user = principal.user.clone();
            d.role = principal.role.clone();
            d.scopes = Some(principal.scope_text.clone());
            // The patient whose data is touched is what the URL or the resource names; the
            // token's patient context is the fallback (see `AuditDraft::into_record`).
            d.context_patient = principal.patient.clone();
        });
    }
    // Components behind the stack read identity from these headers: never trust a client's.
    let headers = req.headers_mut();
    for name in [
        "x-tributary-tenant",
        "x-tributary-client",
        "x-tributary-user",
        "x-tributary-break-glass",
        "x-tributary-patient",
    ] {
        headers.remove(name);
    }
    if let Some(v) = principal
        .patient
        .as_deref()
        .and_then(|p| axum::http::HeaderValue::from_str(p).ok())
    {
        headers.insert("x-tributary-patient", v);
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&principal.tenant) {
        headers.insert("x-tributary-tenant", v);
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&principal.client_id) {
        headers.insert("x-tributary-client", v);
    }
    req.extensions_mut().insert(principal);
    Step::Next(req)
}

/// Applies roles, scopes, patient context and break-glass; puts the [`Access`] in the request.
///
/// [`Access`]: crate::policy::Access
fn authorize(st: &AppState, mut req: Request) -> Step {
    let Some(fhir) = req.extensions().get::<FhirRequest>().cloned() else {
        return Step::Answer(ApiError::Internal("request not classified".into()).into_response());
    };
    if fhir.interaction == Interaction::Capabilities {
        return Step::Next(req);
    }
    let Some(principal) = req
        .extensions()
        .get::<Arc<crate::auth::Principal>>()
        .cloned()
    else {
        return Step::Answer(
            ApiError::Unauthorized("bearer token required".into()).into_response(),
        );
    };
    let reason = match req.headers().get(&BREAK_GLASS).map(|v| v.to_str()) {
        None => None,
        Some(Ok(r)) => Some(r.trim().to_string()),
        Some(Err(_)) => {
            return Step::Answer(
                ApiError::BadRequest("X-Break-Glass must be a reason code".into()).into_response(),
            )
        }
    };
    let slot = req.extensions().get::<AuditSlot>().cloned();
    if let (Some(slot), Some(r)) = (&slot, &reason) {
        // Record the attempt; a reason outside the configured codes is recorded as `invalid`.
        let code = if st.facade.cfg.break_glass.reasons.contains(r) {
            r.clone()
        } else {
            "invalid".into()
        };
        slot.update(|d| d.break_glass = Some(code));
    }
    match crate::policy::authorize(
        &principal,
        &fhir,
        reason.as_deref(),
        &st.facade.cfg.break_glass,
    ) {
        Ok(access) => {
            if !access.break_glass {
                if let Some(slot) = &slot {
                    slot.update(|d| d.break_glass = None);
                }
            }
            req.extensions_mut().insert(access);
            Step::Next(req)
        }
        Err(e) => Step::Answer(e.into_response()),
    }
}

/// For routes served by other components (mounted through [`crate::app_with`]): an instance
/// request (`Subscription/<id>/$status`, `$events`, `$get-ws-binding-token`) passes only when
/// the caller may read that resource — the same check as a `read` (404, 410 or 403 otherwise).
/// `$events` and a websocket binding also hand out the resources the Subscription delivers, so
/// they need a caller whose own token could read all of them (403 otherwise).
pub async fn instance_guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let delivers = {
        let path = req.uri().path();
        path.ends_with("/$events") || path.ends_with("/$get-ws-binding-token")
    };
    let fhir = req.extensions().get::<FhirRequest>();
    let access = req.extensions().get::<crate::policy::Access>();
    let slot = req
        .extensions()
        .get::<AuditSlot>()
        .cloned()
        .unwrap_or_default();
    if let (Some(f), Some(a)) = (fhir, access) {
        if let (Some(t), Some(id)) = (&f.resource_type, &f.id) {
            match crate::rest::read_visible(&st, a, t, id, &slot) {
                Err(e) => return e.into_response(),
                Ok((_, v)) if delivers && !crate::subscription::covers(a, &v) => {
                    return ApiError::Forbidden(
                        "this Subscription delivers resources your token may not read".into(),
                    )
                    .into_response();
                }
                Ok(_) => {}
            }
        }
    }
    next.run(req).await
}

/// Charges the request's cost to the caller's buckets; 429 with `Retry-After` when short.
/// Every response carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
/// (`Ok` gives the quota for the caller to put on the response).
fn rate_limit(st: &AppState, req: Request) -> Step<(Request, Option<crate::ratelimit::Quota>)> {
    let limiter = &st.facade.limiter;
    if !limiter.enabled() {
        return Step::Next((req, None));
    }
    let fhir = req.extensions().get::<FhirRequest>();
    let principal = req.extensions().get::<Arc<crate::auth::Principal>>();
    let (Some(fhir), Some(p)) = (fhir, principal) else {
        return Step::Next((req, None)); // public endpoints
    };
    let cost = limiter.cost(fhir);
    let class = crate::ratelimit::RateLimiter::class(fhir);
    match limiter.check(&p.tenant, &p.client_id, p.user.as_deref(), class, cost) {
        Ok(q) => Step::Next((req, Some(q))),
        Err(l) => {
            let mut res = ApiError::TooManyRequests {
                retry_after_secs: l.retry_after_secs,
            }
            .into_response();
            quota_headers(&mut res, &l.quota);
            Step::Answer(res)
        }
    }
}

fn quota_headers(res: &mut Response, quota: &crate::ratelimit::Quota) {
    let h = res.headers_mut();
    for (name, v) in [
        ("ratelimit-limit", quota.limit),
        ("ratelimit-remaining", quota.remaining),
        ("ratelimit-reset", quota.reset_secs),
    ] {
        h.insert(HeaderName::from_static(name), HeaderValue::from(v));
    }
}
