//! HTTP side: `$status`, `$events`, the dead-letter list, and the inbound notification endpoint
//! (Subscriptions in). Exported as one axum [`Router`] the binary mounts under the FHIR base.
//!
//! Tenant: taken from the `x-tributary-tenant` request header that the facade's authorization
//! layer sets, else the default tenant.

use crate::bundle::{self, NotificationType, NumberedEvent, StatusInfo};
use crate::config::InboundPartner;
use crate::engine::{SubState, SubscriptionService};
use crate::model::{ChannelType, Content, SubscriptionSpec};
use crate::upstream::{fetch_resources, FetchError};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tributary_core::{Envelope, MessageId, Protocol};
use tributary_storage::Journal;

#[derive(Clone)]
pub struct ApiState {
    pub service: Arc<SubscriptionService>,
    pub journal: Arc<dyn Journal>,
    /// Counts inbound notifications (`tributary_ingress_messages_total`, source
    /// `fhir-subscription`).
    pub metrics: tributary_runtime::Metrics,
}

pub fn router(state: ApiState) -> Router {
    router_at("", state)
}

/// Both halves under `prefix` (e.g. `/fhir`), as plain paths so they merge with the facade's
/// routes without a nesting conflict. Tests use this; `serve` mounts the halves separately.
pub fn router_at(prefix: &str, state: ApiState) -> Router {
    operations_router_at(prefix, state.clone())
        .merge(inbound_router_at(prefix, state.clone()))
        .merge(websocket_router_at(prefix, state))
}

/// `GET <prefix>/subscription-ws`: the websocket channel (binding-token authenticated).
pub fn websocket_router_at(prefix: &str, state: ApiState) -> Router {
    Router::new()
        .route(
            &format!("{prefix}/subscription-ws"),
            get(crate::ws::upgrade),
        )
        .with_state(state)
}

/// `$status`, `$events`, `$dead-letters`: they serve resources and event metadata, so they
/// MUST be mounted behind the facade's policy stack (authenticate → authorize → audit), which
/// also sets the `x-tributary-tenant` header from the token (never from the client).
pub fn operations_router_at(prefix: &str, state: ApiState) -> Router {
    Router::new()
        .route(
            &format!("{prefix}/Subscription/{{id}}/$status"),
            get(status),
        )
        .route(
            &format!("{prefix}/Subscription/{{id}}/$events"),
            get(events),
        )
        .route(
            &format!("{prefix}/Subscription/$dead-letters"),
            get(dead_letters),
        )
        .route(
            &format!("{prefix}/Subscription/{{id}}/$get-ws-binding-token"),
            get(ws_binding_token).post(ws_binding_token),
        )
        .with_state(state)
}

/// `POST /subscription-hook/<partner>`: authenticated by the partner's own bearer token, so it
/// is mounted outside the facade's SMART stack.
pub fn inbound_router_at(prefix: &str, state: ApiState) -> Router {
    Router::new()
        .route(
            &format!("{prefix}/subscription-hook/{{partner}}"),
            post(inbound),
        )
        .with_state(state)
}

fn outcome(code: StatusCode, issue: &str, text: &str) -> Response {
    let body = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": issue, "diagnostics": text}],
    });
    (
        code,
        [("content-type", "application/fhir+json")],
        Json(body),
    )
        .into_response()
}

fn fhir(body: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/fhir+json")],
        Json(body),
    )
        .into_response()
}

fn tenant(state: &ApiState, headers: &HeaderMap) -> String {
    headers
        .get("x-tributary-tenant")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| state.service.default_tenant.clone())
}

/// The subscription's spec and state: from the running worker, else from the store.
/// (The error is the finished HTTP answer; these are rare, so its size does not matter.)
#[allow(clippy::result_large_err)]
fn load(
    state: &ApiState,
    tenant: &str,
    id: &str,
) -> Result<(SubscriptionSpec, SubState), Response> {
    let stored = state
        .service
        .store
        .read(tenant, "Subscription", id)
        .map_err(|_| {
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "store error",
            )
        })?
        .filter(|r| !r.deleted)
        .ok_or_else(|| outcome(StatusCode::NOT_FOUND, "not-found", "no such Subscription"))?;
    let body = stored.resource().map_err(|_| {
        outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "store error",
        )
    })?;
    let mut spec = SubscriptionSpec::parse(tenant, id, stored.version, &body, true)
        .map_err(|e| outcome(StatusCode::UNPROCESSABLE_ENTITY, "invalid", &e.to_string()))?;
    spec.incarnation = state
        .service
        .incarnation(tenant, id, stored.version)
        .map_err(|_| {
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "store error",
            )
        })?;
    // The worker's view, unless it is of an earlier incarnation the rescan has not replaced yet.
    if let Some((spec, mut st)) = state
        .service
        .state(tenant, id)
        .filter(|(s, _)| s.incarnation == spec.incarnation)
    {
        // The worker knows what it delivered; `$status` also counts what matched since.
        st.events_since_start = st
            .events_since_start
            .max(state.service.events_since_start(&spec));
        return Ok((spec, st));
    }
    let st = SubState {
        status: spec.status.clone(),
        events_since_start: state.service.events_since_start(&spec),
        error: body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string),
        ..Default::default()
    };
    Ok((spec, st))
}

async fn status(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let t = tenant(&state, &headers);
    let (spec, st) = match load(&state, &t, &id) {
        Ok(x) => x,
        Err(r) => return r,
    };
    fhir(bundle::status_bundle(&StatusInfo {
        base_url: &state.service.cfg.base_url,
        spec: &spec,
        status: &st.status,
        events_since_start: st.events_since_start,
        error: st.error.as_deref(),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventsQuery {
    events_since_number: Option<u64>,
    events_until_number: Option<u64>,
    content: Option<String>,
}

/// `$events`: past notifications re-built from the outbox (catch-up after downtime).
async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let t = tenant(&state, &headers);
    let (spec, st) = match load(&state, &t, &id) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let content = match q.content.as_deref() {
        None => spec.content,
        Some("empty") => Content::Empty,
        Some("id-only") => Content::IdOnly,
        Some("full-resource") => Content::FullResource,
        Some(other) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("content {other:?}: expected empty, id-only or full-resource"),
            )
        }
    };
    let start = match state.service.start_of(&spec) {
        Ok(0) | Err(_) => {
            return outcome(
                StatusCode::CONFLICT,
                "not-found",
                "this Subscription has not started delivering yet",
            )
        }
        Ok(s) => s,
    };
    let since = q.events_since_number.unwrap_or(1).max(1);
    let until = q.events_until_number.unwrap_or(u64::MAX);
    let page = match state.service.events_page(&spec, start, since, until, 100) {
        Ok(x) => x,
        Err(_) => {
            return outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "store error",
            )
        }
    };
    if let Some((first, last)) = page.pruned {
        // Not a shorter Bundle: the client must learn that these events are gone for good.
        let next = match page.events.first() {
            Some((n, _)) => format!("; the earliest event still available is number {n}"),
            None => String::new(),
        };
        return outcome(
            StatusCode::GONE,
            "not-found",
            &format!(
                "events {first} to {last} of this Subscription are past the outbox retention \
                 and can no longer be returned{next}"
            ),
        );
    }
    let (total, found) = (page.total, page.events);
    let numbered: Vec<NumberedEvent<'_>> = found
        .iter()
        .map(|(n, e)| NumberedEvent {
            number: *n,
            event: e,
        })
        .collect();
    // Whose events these are, for the facade's audit layer: each patient's report lists this
    // catch-up as it lists a delivered notification.
    let mut seen = tributary_runtime::PatientsDisclosed::default();
    for (_, e) in &found {
        if let Some(p) = e.patient_id.as_deref() {
            seen.add(p, 1);
        }
    }
    let mut res = fhir(bundle::notification_bundle(
        &StatusInfo {
            base_url: &state.service.cfg.base_url,
            spec: &spec,
            status: &st.status,
            events_since_start: total.max(st.events_since_start),
            error: st.error.as_deref(),
        },
        NotificationType::QueryEvent,
        &numbered,
        content,
    ));
    if !seen.is_empty() {
        res.extensions_mut().insert(seen);
    }
    res
}

/// `$get-ws-binding-token` on one Subscription (its channel must be `websocket`). The facade
/// has already checked that the caller's token may read this Subscription (tenant, scopes,
/// patient context); the token returned binds one websocket connection to it, once, briefly.
async fn ws_binding_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    tls: Option<axum::Extension<tributary_runtime::http_server::Secure>>,
) -> Response {
    let t = tenant(&state, &headers);
    let (spec, _) = match load(&state, &t, &id) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if spec.channel != ChannelType::Websocket {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "the Subscription's channel.type is not websocket",
        );
    }
    if spec.status == "off" || spec.status == "error" {
        return outcome(
            StatusCode::CONFLICT,
            "processing",
            &format!("the Subscription's status is {}", spec.status),
        );
    }
    let cfg = &state.service.cfg;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Some((token, expires)) = state.service.ws_tokens.issue(
        &t,
        &id,
        header("x-tributary-client"),
        header("x-tributary-patient"),
        std::time::Duration::from_secs(cfg.ws_token_ttl_secs),
    ) else {
        return outcome(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "too many binding tokens outstanding",
        );
    };
    let url = if cfg.websocket_url.is_empty() {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
            })
            .unwrap_or("localhost");
        let secure = tls.is_some()
            || headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                == Some("https");
        let scheme = if secure { "wss" } else { "ws" };
        format!("{scheme}://{host}{}/subscription-ws", cfg.path_prefix)
    } else {
        cfg.websocket_url.clone()
    };
    tracing::info!(subscription = %id, tenant = %t, "websocket binding token issued");
    fhir(crate::ws::token_parameters(&token, expires, &id, &url))
}

async fn dead_letters(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let t = tenant(&state, &headers);
    // A patient-context caller sees only the dead letters of its own patient's subscriptions.
    let patient = headers
        .get("x-tributary-patient")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut visible: std::collections::HashMap<String, bool> = Default::default();
    let all = match state.service.dead_letters() {
        Ok(l) => l,
        Err(_) => {
            return outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "store error",
            )
        }
    };
    let list: Vec<_> = all
        .into_iter()
        .filter(|d| d.tenant == t)
        .filter(|d| {
            let Some(p) = &patient else { return true };
            *visible.entry(d.subscription.clone()).or_insert_with(|| {
                load(&state, &t, &d.subscription)
                    .map(|(spec, _)| spec.patient_context.as_deref() == Some(p.as_str()))
                    .unwrap_or(false)
            })
        })
        .collect();
    Json(json!({"deadLetters": list})).into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const INGRESS_SOURCE: &str = "fhir-subscription";

fn count_ingress(state: &ApiState, outcome: &str) {
    state.metrics.inc(
        "tributary_ingress_messages_total",
        &[("source", INGRESS_SOURCE), ("outcome", outcome)],
    );
}

/// An authenticated partner's notification we do not accept: kept in the journal as rejected,
/// with the reason, for inspection and replay — then a 400 OperationOutcome naming the reason.
async fn refuse(
    state: &ApiState,
    p: &InboundPartner,
    tenant: &str,
    body: Bytes,
    code: &str,
    reason: &str,
) -> (Response, Received) {
    let env = Envelope::builder(Protocol::Fhir, body.to_vec())
        .tenant(tenant)
        .partner(p.partner.as_str())
        .meta("ingress", INGRESS_SOURCE)
        .build();
    match state.journal.append_rejected(env, reason.to_string()).await {
        Ok(r) => {
            // The reason may quote the sender's text, so the log names the message id only.
            tracing::warn!(partner = %p.partner, message_id = %r.id, code, "inbound notification rejected; journaled as rejected");
            count_ingress(state, "rejected");
            (
                outcome(StatusCode::BAD_REQUEST, code, reason),
                Received::stored("rejected", r.id),
            )
        }
        Err(e) => {
            tracing::error!(partner = %p.partner, error = %e, "rejected inbound notification could not be journaled");
            journal_unavailable()
        }
    }
}

fn journal_unavailable() -> (Response, Received) {
    (
        outcome(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "journal unavailable",
        ),
        Received::outcome("storage_unavailable"),
    )
}

/// What became of one inbound POST, for its audit record.
struct Received {
    outcome: &'static str,
    message_id: Option<MessageId>,
    /// The notification's type (`handshake`, `event-notification`, …), once read.
    kind: Option<String>,
    events: Option<usize>,
}

impl Received {
    fn outcome(outcome: &'static str) -> Self {
        Self {
            outcome,
            message_id: None,
            kind: None,
            events: None,
        }
    }

    fn stored(outcome: &'static str, id: MessageId) -> Self {
        Self {
            message_id: Some(id),
            ..Self::outcome(outcome)
        }
    }
}

fn tenant_of(state: &ApiState, p: &InboundPartner) -> String {
    if p.tenant.is_empty() {
        state.service.default_tenant.clone()
    } else {
        p.tenant.clone()
    }
}

/// `POST /subscription-hook/<partner>`: a notification from an upstream FHIR server.
/// Handshakes and heartbeats are answered; event notifications (id-only ones completed with
/// the resources) are journaled as FHIR messages before the 200.
///
/// Every POST gets one PHI-free `ingress` audit record before the answer, whatever became of
/// it: a bad token or an unknown partner too (the path's partner name is recorded only when it
/// is a configured partner).
async fn inbound(
    State(state): State<ApiState>,
    Path(partner): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let known = state
        .service
        .cfg
        .inbound
        .iter()
        .find(|p| p.partner == partner)
        .cloned();
    let (res, received) = match &known {
        None => (
            outcome(StatusCode::NOT_FOUND, "not-found", "unknown partner"),
            Received::outcome("unknown_partner"),
        ),
        Some(p) => receive(&state, p, &headers, body).await,
    };
    let mut record = json!({
        "kind": "ingress",
        "protocol": INGRESS_SOURCE,
        "at": tributary_core::format_rfc3339_millis(tributary_core::now_millis()),
        "tenant": known.as_ref().map_or_else(|| state.service.default_tenant.clone(), |p| tenant_of(&state, p)),
        "partner": known.as_ref().map(|p| p.partner.as_str()),
        "outcome": received.outcome,
        "status": res.status().as_u16(),
        "message_id": received.message_id.map(|i| i.to_string()),
    });
    if let Some(kind) = received.kind {
        record["notification"] = Value::String(kind);
    }
    if let Some(n) = received.events {
        record["events"] = json!(n);
    }
    state.service.append_audit(record).await;
    res
}

async fn receive(
    state: &ApiState,
    p: &InboundPartner,
    headers: &HeaderMap,
    body: Bytes,
) -> (Response, Received) {
    let partner = &p.partner;
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), p.token.as_bytes()) {
        tracing::warn!(%partner, "inbound notification with a bad or missing token");
        return (
            outcome(
                StatusCode::UNAUTHORIZED,
                "login",
                "bad or missing bearer token",
            ),
            Received::outcome("unauthorized"),
        );
    }
    let tenant = tenant_of(state, p);
    let Ok(mut bundle) = serde_json::from_slice::<Value>(&body) else {
        return refuse(state, p, &tenant, body, "structure", "body is not JSON").await;
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        let reason = "expected a notification Bundle";
        return refuse(state, p, &tenant, body, "structure", reason).await;
    }
    let Some((kind, events)) = bundle::read_status(&bundle) else {
        let reason = "the Bundle has no SubscriptionStatus parameters";
        return refuse(state, p, &tenant, body, "structure", reason).await;
    };
    let read = |mut r: Received| {
        // the type only when it is one of the spec's codes (the sender's text otherwise)
        if matches!(
            kind.as_str(),
            "handshake" | "heartbeat" | "event-notification" | "query-event" | "query-status"
        ) {
            r.kind = Some(kind.clone());
        }
        r.events = Some(events.len());
        r
    };
    match kind.as_str() {
        "handshake" | "heartbeat" => {
            tracing::info!(%partner, kind, "inbound subscription notification");
            return (
                (StatusCode::OK, Json(json!({}))).into_response(),
                read(Received::outcome("answered")),
            );
        }
        "event-notification" | "query-event" => {}
        other => {
            let reason = format!("notification type {other:?} is not accepted");
            let (res, r) = refuse(state, p, &tenant, body, "value", &reason).await;
            return (res, read(r));
        }
    }
    let fetched = match fetch_resources(
        &state.service.http,
        &state.service.upstream_tokens,
        p,
        &mut bundle,
    )
    .await
    {
        Ok(n) => n,
        Err(FetchError::Refused(reason)) => {
            let (res, r) = refuse(state, p, &tenant, body, "value", &reason).await;
            return (res, read(r));
        }
        Err(FetchError::Transient(reason)) => {
            tracing::warn!(%partner, %reason, "inbound notification: fetching resources failed");
            // 503: the sender retries later; nothing is journaled half-complete.
            return (
                outcome(StatusCode::SERVICE_UNAVAILABLE, "transient", &reason),
                read(Received::outcome("fetch_failed")),
            );
        }
    };
    let sub = bundle
        .pointer("/entry/0/resource/parameter")
        .and_then(Value::as_array)
        .and_then(|ps| {
            ps.iter()
                .find(|x| x.get("name").and_then(Value::as_str) == Some("subscription"))
        })
        .and_then(|x| x.pointer("/valueReference/reference"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let numbers: Vec<u64> = events.iter().map(|(n, _)| *n).collect();
    let mut env = Envelope::builder(
        Protocol::Fhir,
        serde_json::to_vec(&bundle).expect("a Value always serializes"),
    )
    .tenant(tenant)
    .partner(partner.as_str())
    .meta("ingress", "fhir-subscription")
    .meta("fhir.notification", kind.as_str())
    .meta("fhir.events", numbers.len().to_string())
    .meta("fhir.fetched", fetched.to_string());
    if let (Some(first), Some(last)) = (numbers.first(), numbers.last()) {
        if *first > 0 {
            // With the content: a sender whose numbering restarted (its Subscription created
            // again, its server reset) reuses numbers for new events, which must not be taken
            // for resends. The status entry is left out (a resend may have a new timestamp).
            let content = bundle
                .get("entry")
                .and_then(Value::as_array)
                .map(|e| serde_json::to_vec(&e[1.min(e.len())..]).unwrap_or_default())
                .unwrap_or_default();
            env = env.dedup_key(tributary_core::content_dedup_key(
                partner,
                &format!("{sub}/{first}-{last}"),
                &content,
            ));
        }
    }
    match state.journal.append(env.build()).await {
        Ok(r) => {
            tracing::info!(%partner, message_id = %r.id, events = numbers.len(), fetched, duplicate = r.duplicate, "inbound notification journaled");
            let counted = if r.duplicate { "duplicate" } else { "accepted" };
            count_ingress(state, counted);
            (
                (StatusCode::OK, Json(json!({}))).into_response(),
                read(Received::stored(counted, r.id)),
            )
        }
        Err(e) => {
            tracing::error!(%partner, error = %e, "inbound notification could not be journaled");
            let (res, r) = journal_unavailable();
            (res, read(r))
        }
    }
}
