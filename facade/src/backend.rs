//! Routing to backend FHIR servers: a request for a routed (tenant, resource type) is forwarded
//! by the innermost layer instead of reaching the store handlers. The caller's `Authorization`
//! is never forwarded (a fresh request is built; only the body, path and query are copied) and
//! sanitized identity headers are added. Responses are filtered with the same [`Access`] rules as
//! the store's: a resource the caller may not see is refused (403) or dropped from a Bundle.

use crate::audit::AuditSlot;
use crate::config::BackendConfig;
use crate::error::ApiError;
use crate::pipeline::Step;
use crate::policy::{patient_links, Access, FhirRequest, Interaction};
use crate::scopes::Perm;
use crate::AppState;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_runtime::http::{read_limited, BodyError};
use tributary_runtime::{ComponentStatus, Metrics, Readiness};

/// The parameter that carries a backend's own page link (of a search or a history) through the
/// facade, for a link not of the `{base}/{type}?…` shape. Only the path and query below the backend's base URL are
/// carried, and a link given back is checked again ([`Backend::page_of`]).
pub(crate) const PAGE_PARAM: &str = "_backend_page";

pub struct Backend {
    pub cfg: BackendConfig,
    client: reqwest::Client,
    /// Whether the last request failed to reach it (so `/ready` changes only on a change).
    unreachable: std::sync::atomic::AtomicBool,
    /// What the last health check noticed about the answer to `GET /metadata` (not a
    /// CapabilityStatement, not R4), so it is logged once, not at every check.
    metadata_note: std::sync::Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("backend {name}: {detail}")]
pub struct BackendSetupError {
    pub name: String,
    pub detail: String,
}

/// The routing table.
#[derive(Default)]
pub struct Backends {
    list: Vec<Backend>,
}

impl Backends {
    pub fn new(cfgs: &[BackendConfig]) -> Result<Self, BackendSetupError> {
        let mut list = Vec::new();
        for cfg in cfgs {
            let err = |detail: String| BackendSetupError {
                name: cfg.name.clone(),
                detail,
            };
            let mut b = reqwest::Client::builder()
                .timeout(Duration::from_secs(cfg.timeout_secs))
                .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
                .pool_max_idle_per_host(cfg.pool_max_idle)
                .redirect(reqwest::redirect::Policy::none())
                .use_rustls_tls();
            if !cfg.ca_file.as_os_str().is_empty() {
                let pem = std::fs::read(&cfg.ca_file)
                    .map_err(|e| err(format!("ca_file {}: {e}", cfg.ca_file.display())))?;
                let cert = reqwest::Certificate::from_pem(&pem)
                    .map_err(|e| err(format!("ca_file: {e}")))?;
                b = b.add_root_certificate(cert);
            }
            if !cfg.client_identity_file.as_os_str().is_empty() {
                let pem = std::fs::read(&cfg.client_identity_file).map_err(|e| {
                    err(format!(
                        "client_identity_file {}: {e}",
                        cfg.client_identity_file.display()
                    ))
                })?;
                let id = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| err(format!("client_identity_file: {e}")))?;
                b = b.identity(id);
            }
            let client = b.build().map_err(|e| err(e.to_string()))?;
            list.push(Backend {
                cfg: cfg.clone(),
                client,
                unreachable: false.into(),
                metadata_note: Default::default(),
            });
        }
        Ok(Self { list })
    }

    /// Whether some tenant's requests for `rtype` go to a backend (for the CapabilityStatement).
    pub fn routes_type(&self, rtype: &str) -> bool {
        self.list
            .iter()
            .any(|b| b.cfg.resource_types.iter().any(|t| t == rtype))
    }

    /// Lists every backend in `/ready` (as `backend.<name>`); a backend that stops answering is
    /// reported `degraded` by the request that finds out, and `ready` again by the next that
    /// gets an answer. Requests for other resource types are unaffected, so it never makes the
    /// instance unready.
    pub fn report_readiness(&self, readiness: &Readiness) {
        for b in &self.list {
            readiness.set(&b.component(), ComponentStatus::Ready);
        }
    }

    /// Asks every backend with `health_check_secs` > 0 for `GET <url>/metadata`, at once and
    /// then at that interval, until `shutdown`: a backend that cannot be reached shows as
    /// `degraded` in `/ready` before a request is routed to it, and `ready` once it answers.
    /// Any HTTP answer counts as reachable, as for routed requests; one that is not an R4
    /// CapabilityStatement is logged (a wrong `url`, a server of another FHIR version). Returns
    /// at shutdown.
    pub async fn watch_health(
        &self,
        readiness: &Readiness,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) {
        let checks = self
            .list
            .iter()
            .filter(|b| b.cfg.health_check_secs > 0)
            .map(|b| async move {
                let every = Duration::from_secs(b.cfg.health_check_secs);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        outcome = b.check_health(readiness) => {
                            metrics.inc(
                                "tributary_backend_health_checks_total",
                                &[("backend", b.cfg.name.as_str()), ("outcome", outcome)],
                            );
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                }
            });
        futures_util::future::join_all(checks).await;
        shutdown.cancelled().await;
    }

    /// A request routed to backend `name` ran out of `http.request_timeout_secs` before it
    /// answered (its own `timeout_secs` is longer): it counts as not answering.
    pub(crate) fn timed_out(&self, name: &str, readiness: &Readiness) {
        if let Some(b) = self.list.iter().find(|b| b.cfg.name == name) {
            b.record_reachable(
                readiness,
                Err(b.unreachable_reason("no answer within the request timeout")),
            );
        }
    }

    pub fn route(&self, tenant: &str, rtype: &str) -> Option<&Backend> {
        self.list
            .iter()
            .find(|b| b.serves(tenant) && b.cfg.resource_types.iter().any(|t| t == rtype))
    }

    /// The types `tenant`'s requests go to a backend for, with that backend's name, by type.
    pub fn routed_types(&self, tenant: &str) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for b in self.list.iter().filter(|b| b.serves(tenant)) {
            for t in &b.cfg.resource_types {
                if !out.iter().any(|(seen, _)| seen == t) {
                    out.push((t, &b.cfg.name));
                }
            }
        }
        out.sort_unstable();
        out
    }
}

impl Backend {
    /// A failure status from the backend, for an answer the facade builds itself (the
    /// backend's own OperationOutcome may carry data).
    fn answered(&self, status: reqwest::StatusCode) -> ApiError {
        ApiError::Backend(format!(
            "backend {} answered {}",
            self.cfg.name,
            status.as_u16()
        ))
    }

    fn json(&self, bytes: &[u8]) -> Result<Value, ApiError> {
        serde_json::from_slice(bytes).map_err(|_| {
            ApiError::Backend(format!(
                "backend {} answered something that is not JSON",
                self.cfg.name
            ))
        })
    }

    /// `url`, from one of this backend's Bundles, as the path and query of a page of an `rtype`
    /// search on it: under its base URL, at the base itself (HAPI pages from there:
    /// `{base}?_getpages=…`) or at `/{rtype}`. Any other link (another host, another path) is
    /// not followed.
    fn page_of<'u>(&self, url: &'u str, rtype: &str) -> Option<(&'u str, Option<&'u str>)> {
        let rest = url.strip_prefix(self.cfg.url.trim_end_matches('/'))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let allowed = path.is_empty() || path == "/" || path.strip_prefix('/') == Some(rtype);
        (allowed && !rest.contains('#')).then_some((path, query))
    }

    fn serves(&self, tenant: &str) -> bool {
        self.cfg.tenants.is_empty() || self.cfg.tenants.iter().any(|t| t == tenant)
    }

    fn component(&self) -> String {
        format!("backend.{}", self.cfg.name)
    }

    fn unreachable_reason(&self, kind: &str) -> String {
        self.unreachable_reason_from("last request", kind)
    }

    fn unreachable_reason_from(&self, what: &str, kind: &str) -> String {
        format!(
            "backend {}: {kind} ({what} at {}); requests routed to it get 502/504",
            self.cfg.name,
            tributary_core::format_rfc3339_millis(tributary_core::now_millis())
        )
    }

    /// One health check (see [`Backends::watch_health`]); returns its outcome for the metric.
    async fn check_health(&self, readiness: &Readiness) -> &'static str {
        let url = format!("{}/metadata", self.cfg.url.trim_end_matches('/'));
        let answer = match self
            .client
            .get(&url)
            .header("accept", "application/fhir+json")
            .send()
            .await
        {
            Ok(res) => {
                let status = res.status();
                read_limited(res, self.cfg.max_response_bytes)
                    .await
                    .map(|body| (status, body))
            }
            Err(e) => Err(BodyError::Failed(e)),
        };
        match answer {
            Ok((status, body)) => {
                self.record_reachable(readiness, Ok(()));
                self.note_metadata(metadata_problem(status, &body));
                "answered"
            }
            Err(e) => {
                let kind = match &e {
                    BodyError::Failed(e) if e.is_timeout() => "no answer within timeout_secs",
                    BodyError::Failed(e) if e.is_connect() => "connection failed",
                    BodyError::Failed(_) => "request failed",
                    // an answer all the same: reachable
                    BodyError::TooLarge { .. } => {
                        self.record_reachable(readiness, Ok(()));
                        return "answered";
                    }
                };
                if !self.unreachable.load(std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(backend = %self.cfg.name, reason = kind, "backend health check failed");
                }
                self.record_reachable(
                    readiness,
                    Err(self.unreachable_reason_from(
                        "health check",
                        &format!("{kind} on GET /metadata"),
                    )),
                );
                "unreachable"
            }
        }
    }

    /// Logs what is wrong with the `/metadata` answer when it changes (and once it is right
    /// again), never at every check.
    fn note_metadata(&self, problem: Option<String>) {
        let Ok(mut last) = self.metadata_note.lock() else {
            return;
        };
        if *last == problem {
            return;
        }
        match &problem {
            Some(p) => {
                tracing::warn!(backend = %self.cfg.name, problem = %p, "backend /metadata is not an R4 CapabilityStatement; check its url")
            }
            None if last.is_some() => {
                tracing::info!(backend = %self.cfg.name, "backend /metadata is an R4 CapabilityStatement again")
            }
            None => {}
        }
        *last = problem;
    }

    fn record_reachable(&self, readiness: &Readiness, reachable: Result<(), String>) {
        use std::sync::atomic::Ordering::Relaxed;
        match reachable {
            Ok(()) => {
                if self.unreachable.swap(false, Relaxed) {
                    tracing::info!(backend = %self.cfg.name, "backend answering again");
                    readiness.set(&self.component(), ComponentStatus::Ready);
                }
            }
            Err(reason) => {
                self.unreachable.store(true, Relaxed);
                readiness.set(&self.component(), ComponentStatus::Degraded { reason });
            }
        }
    }
}

/// What is wrong with a backend's answer to `GET /metadata` for an R4 facade, if anything:
/// not a success, not a CapabilityStatement, or another FHIR version than 4.0.x.
fn metadata_problem(status: reqwest::StatusCode, body: &[u8]) -> Option<String> {
    if !status.is_success() {
        return Some(format!("answered HTTP {}", status.as_u16()));
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return Some("answered something that is not JSON".into()),
    };
    if v["resourceType"] != "CapabilityStatement" {
        return Some("answered JSON that is not a CapabilityStatement".into());
    }
    match v["fhirVersion"].as_str() {
        Some(ver) if ver.starts_with("4.0") => None,
        Some(ver) => Some(format!("fhirVersion {ver}, not R4 (4.0.x)")),
        None => Some("its CapabilityStatement has no fhirVersion".into()),
    }
}

/// The innermost policy stage: a routed request is forwarded (the answer is the backend's,
/// filtered); the rest go on to the store handlers.
pub(crate) async fn route(st: &AppState, req: Request) -> Step {
    let (Some(fhir), Some(access)) = (
        req.extensions().get::<FhirRequest>(),
        req.extensions().get::<Access>(),
    ) else {
        return Step::Next(req);
    };
    // An export reads the built-in store and names the routed types among its errors.
    if fhir.interaction == Interaction::Export {
        return Step::Next(req);
    }
    let Some(rtype) = fhir.resource_type.as_deref() else {
        return Step::Next(req);
    };
    let Some(backend) = st.facade.backends.route(&access.principal.tenant, rtype) else {
        return Step::Next(req);
    };
    let (fhir, access) = (fhir.clone(), access.clone());
    let slot = req
        .extensions()
        .get::<AuditSlot>()
        .cloned()
        .unwrap_or_default();
    slot.update(|d| d.backend = Some(backend.cfg.name.clone()));
    Step::Answer(
        match forward(st, backend, &fhir, &access, &slot, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
    )
}

async fn forward(
    st: &AppState,
    backend: &Backend,
    fhir: &FhirRequest,
    access: &Access,
    slot: &AuditSlot,
    req: Request,
) -> Result<Response, ApiError> {
    let rtype = fhir.resource_type.clone().unwrap_or_default();
    let perm = match fhir.interaction {
        Interaction::Read | Interaction::Vread | Interaction::HistoryInstance => Perm::Read,
        Interaction::Search | Interaction::HistoryType => Perm::Search,
        Interaction::Create => Perm::Create,
        Interaction::Update => Perm::Update,
        Interaction::Delete if fhir.id.is_some() => Perm::Delete,
        _ => {
            return Err(ApiError::MethodNotAllowed(format!(
                "{} is not available for {rtype} (served by a backend)",
                fhir.interaction.name()
            )))
        }
    };
    let method = req.method().clone();
    let incoming = req
        .uri()
        .path()
        .strip_prefix("/fhir")
        .unwrap_or("")
        .to_string();
    let paged = matches!(
        fhir.interaction,
        Interaction::Search | Interaction::HistoryType | Interaction::HistoryInstance
    );
    let (path, query) = match fhir.param(PAGE_PARAM) {
        Some(page) if paged => {
            let url = format!("{}{page}", backend.cfg.url.trim_end_matches('/'));
            let (p, q) = backend.page_of(&url, &rtype).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{PAGE_PARAM} is not a page link this facade gave for {rtype}"
                ))
            })?;
            (p.to_string(), q.map(String::from))
        }
        _ => (incoming.clone(), req.uri().query().map(String::from)),
    };
    let body = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .map_err(|_| ApiError::BadRequest("body too large".into()))?;
    if matches!(perm, Perm::Create | Perm::Update) {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| ApiError::BadRequest("body is not JSON".into()))?;
        crate::rest::check_resource(&v, &rtype)?;
        let id = fhir.id.clone().unwrap_or_default();
        if !access.permits(perm, &rtype, &id, &v) {
            return Err(ApiError::out_of_scope());
        }
    }
    if perm == Perm::Update && fhir.id.is_none() {
        // A conditional update would replace whatever the backend's search matches, which the
        // caller's access cannot be checked against first.
        return Err(ApiError::MethodNotAllowed(format!(
            "conditional update is not available for {rtype} (served by a backend): update by id"
        )));
    }
    if matches!(perm, Perm::Update | Perm::Delete) {
        // Check the current resource first: what an update replaces or a delete removes must be
        // within the caller's access too, not only the body written.
        let current = get(st, backend, access, slot, &path, None).await?;
        if current.0.is_success() {
            let v: Value = serde_json::from_slice(&current.1).unwrap_or(Value::Null);
            if !access.permits(perm, &rtype, fhir.id.as_deref().unwrap_or(""), &v) {
                return Err(ApiError::out_of_scope());
            }
        }
    }
    let m = reqwest::Method::from_bytes(method.as_str().as_bytes())
        .map_err(|_| ApiError::BadRequest("method".into()))?;
    let (status, bytes) = call(
        st,
        backend,
        access,
        slot,
        m,
        &path,
        query.as_deref(),
        body.to_vec(),
    )
    .await?;
    if !status.is_success() {
        // The backend's own OperationOutcome may carry data; answer with ours.
        let msg = format!("backend answered {}", status.as_u16());
        return Err(match status.as_u16() {
            400 => ApiError::BadRequest(msg),
            404 => ApiError::NotFound(msg),
            409 => ApiError::Conflict(msg),
            410 => ApiError::Gone(msg),
            412 => ApiError::PreconditionFailed(msg),
            422 => ApiError::Unprocessable(msg),
            401 | 403 => ApiError::Backend("backend refused the facade's request".into()),
            _ => ApiError::Backend(msg),
        });
    }
    if bytes.is_empty() {
        let mut r = Response::new(axum::body::Body::empty());
        *r.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::OK);
        return Ok(r);
    }
    let mut v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| ApiError::Backend("backend answered something that is not JSON".into()))?;
    let base = crate::rest::base_url(st, &axum::http::HeaderMap::new());
    let our_base = if st.facade.cfg.base_url.is_empty() {
        String::from("/fhir")
    } else {
        base
    };
    let backend_base = backend.cfg.url.trim_end_matches('/');
    if v.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
        let entries = v
            .get("entry")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let before = entries.len();
        let kept: Vec<Value> = entries
            .into_iter()
            .filter(|e| {
                let Some(r) = e.get("resource") else {
                    // Deletions in a history carry no resource: only for un-narrowed callers.
                    return access.compartment_for(perm, &rtype).is_none()
                        && access.may(perm, &rtype);
                };
                let t = r.get("resourceType").and_then(Value::as_str).unwrap_or("");
                let id = r.get("id").and_then(Value::as_str).unwrap_or("");
                let p = if t == rtype { perm } else { Perm::Read };
                access.permits(p, t, id, r)
            })
            .collect();
        let dropped = before - kept.len();
        if access.narrowed(perm, &rtype) {
            // The backend counted everything its search matched, not what this caller may see
            // (a `_summary=count` would otherwise tell a patient-context token how many other
            // patients have a code); a narrowed caller gets no total.
            if let Some(o) = v.as_object_mut() {
                o.remove("total");
            }
        } else if dropped > 0 {
            if let Some(total) = v.get("total").and_then(Value::as_u64) {
                v["total"] = Value::from(total.saturating_sub(dropped as u64));
            }
        }
        let mut seen = crate::audit::Disclosed::default();
        for r in kept.iter().filter_map(|e| e.get("resource")) {
            let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
            seen.add(s("resourceType"), s("id"), r);
        }
        slot.disclose(seen);
        slot.update(|d| d.returned = Some(kept.len()));
        v["entry"] = Value::Array(kept);
        // A page link the facade could not route by replacing the base (HAPI's
        // `{base}?_getpages=…`) is carried in a parameter of the request it answers (a search,
        // or a history), so following it takes the same permission.
        for l in v
            .get_mut("link")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let Some(url) = l.get("url").and_then(Value::as_str) else {
                continue;
            };
            if let Some((path, _)) = backend.page_of(url, &rtype) {
                if path.strip_prefix('/') != Some(rtype.as_str()) {
                    let page = crate::search::encode(&url[backend_base.len()..]);
                    l["url"] = Value::String(format!("{our_base}{incoming}?{PAGE_PARAM}={page}"));
                }
            }
        }
        // Links and fullUrls point at the facade, never at the backend.
        let text = serde_json::to_string(&v)
            .unwrap_or_default()
            .replace(backend_base, &our_base);
        return Ok(crate::rest::json_response(
            StatusCode::OK,
            text.into_bytes(),
        ));
    }
    let t = v
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if let Some(p) = patient_links(&t, &id, &v).into_iter().next() {
        slot.update(|d| {
            if d.patient.is_none() {
                d.patient = Some(p);
            }
        });
    }
    let read_perm = if matches!(perm, Perm::Create | Perm::Update) {
        perm
    } else {
        Perm::Read
    };
    if t != rtype || !access.permits(read_perm, &t, &id, &v) {
        return Err(ApiError::out_of_scope());
    }
    let mut res = crate::rest::json_response(
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::OK),
        serde_json::to_vec(&v).unwrap_or_default(),
    );
    if let Some(ver) = v
        .get("meta")
        .and_then(|m| m.get("versionId"))
        .and_then(Value::as_str)
    {
        if let Ok(h) = HeaderValue::from_str(&format!("W/\"{ver}\"")) {
            res.headers_mut().insert(header::ETAG, h);
        }
    }
    Ok(res)
}

/// Reads `rtype/id` from `backend` (an `_include` target): `None` when it is gone (404, 410) or
/// the answer is not that resource.
pub(crate) async fn read(
    st: &AppState,
    backend: &Backend,
    access: &Access,
    slot: &AuditSlot,
    rtype: &str,
    id: &str,
) -> Result<Option<Value>, ApiError> {
    let path = format!("/{rtype}/{id}");
    let (status, bytes) = get(st, backend, access, slot, &path, None).await?;
    match status.as_u16() {
        404 | 410 => return Ok(None),
        _ if !status.is_success() => return Err(backend.answered(status)),
        _ => {}
    }
    let v = backend.json(&bytes)?;
    let is = |k: &str, want: &str| v.get(k).and_then(Value::as_str) == Some(want);
    Ok((is("resourceType", rtype) && is("id", id)).then_some(v))
}

/// One backend's part of a patient's `$everything`: the resources of `rtype` it holds in the
/// patient's compartment that the caller may read.
pub(crate) struct CompartmentPart {
    pub resources: Vec<Value>,
    /// Why the backend's answer is not all here (`more than 1000`), when it is not.
    pub more: Option<String>,
}

/// How many pages of one backend search `$everything` follows before it says the rest is a
/// search away: a backend paging 20 at a time still gives 1,000 resources of a type.
const COMPARTMENT_PAGES: usize = 50;

/// Searches `backend` for `rtype` in patient `pid`'s compartment (`patient=`, or `subject=` for
/// a type without `patient`), at most `count` of them, following the backend's `next` links.
/// Whatever the backend answers is kept only when it is of that type, in that patient's
/// compartment and readable by the caller: a backend that ignores the parameter cannot put
/// another patient's data in this patient's answer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn compartment_search(
    st: &AppState,
    backend: &Backend,
    access: &Access,
    slot: &AuditSlot,
    rtype: &str,
    pid: &str,
    count: usize,
    filter: &crate::everything::Filter,
) -> Result<CompartmentPart, ApiError> {
    let param = if crate::search::supports(rtype, "patient") {
        format!("patient={pid}")
    } else {
        format!("subject=Patient/{pid}")
    };
    let mut path = format!("/{rtype}");
    let mut query = format!("{param}&_count={count}");
    if let Some(since) = &filter.since_text {
        query.push_str(&format!("&_lastUpdated=ge{}", crate::search::encode(since)));
    }
    let mut query = Some(query);
    let mut resources = Vec::new();
    for _ in 0..COMPARTMENT_PAGES {
        let (status, bytes) = get(st, backend, access, slot, &path, query.as_deref()).await?;
        if !status.is_success() {
            return Err(backend.answered(status));
        }
        let bundle = backend.json(&bytes)?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(ApiError::Backend(format!(
                "backend {} answered a search with something other than a Bundle",
                backend.cfg.name
            )));
        }
        for r in bundle
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("resource"))
        {
            let id = r.get("id").and_then(Value::as_str).unwrap_or("");
            let kept = r.get("resourceType").and_then(Value::as_str) == Some(rtype)
                && crate::policy::valid_id(id)
                && crate::policy::in_compartment(rtype, id, r, pid, false)
                && access.permits(Perm::Read, rtype, id, r)
                && filter.admits(rtype, r);
            if kept {
                if resources.len() == count {
                    return Ok(CompartmentPart {
                        resources,
                        more: Some(format!("more than {count}")),
                    });
                }
                resources.push(r.clone());
            }
        }
        let Some(next) = link(&bundle, "next") else {
            return Ok(CompartmentPart {
                resources,
                more: None,
            });
        };
        let Some((p, q)) = backend.page_of(next, rtype) else {
            return Ok(CompartmentPart {
                resources,
                more: Some("its next page is not on the backend".into()),
            });
        };
        (path, query) = (p.to_string(), q.map(String::from));
    }
    Ok(CompartmentPart {
        resources,
        more: Some(format!("more than {COMPARTMENT_PAGES} pages")),
    })
}

/// The url of a Bundle's link of `relation` (`next`).
fn link<'b>(bundle: &'b Value, relation: &str) -> Option<&'b str> {
    bundle
        .get("link")?
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)?
        .get("url")?
        .as_str()
}

/// Names the backends a request asked (besides its own route) in its audit record, sorted and
/// comma-separated, unless the request was routed to one (that one is named).
pub(crate) fn note_backends<'a>(slot: &AuditSlot, names: impl Iterator<Item = &'a str>) {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    names.dedup();
    let names = names.join(",");
    slot.update(|d| {
        if d.backend.is_none() {
            d.backend = Some(names);
        }
    });
}

/// A `GET` of `path` (and `query`) from the backend, as [`call`] makes it.
async fn get(
    st: &AppState,
    backend: &Backend,
    access: &Access,
    slot: &AuditSlot,
    path: &str,
    query: Option<&str>,
) -> Result<(reqwest::StatusCode, bytes::Bytes), ApiError> {
    let get = reqwest::Method::GET;
    call(st, backend, access, slot, get, path, query, Vec::new()).await
}

#[allow(clippy::too_many_arguments)]
async fn call(
    st: &AppState,
    backend: &Backend,
    access: &Access,
    slot: &AuditSlot,
    method: reqwest::Method,
    path: &str,
    query: Option<&str>,
    body: Vec<u8>,
) -> Result<(reqwest::StatusCode, bytes::Bytes), ApiError> {
    let mut url = format!("{}{}", backend.cfg.url.trim_end_matches('/'), path);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    let request_id = slot.snapshot().request_id;
    let p = &access.principal;
    let mut rb = backend
        .client
        .request(method, &url)
        .header("accept", "application/fhir+json")
        .header("x-tributary-tenant", &p.tenant)
        .header("x-tributary-client", &p.client_id)
        .header("x-request-id", request_id);
    if let Some(u) = &p.user {
        rb = rb.header("x-tributary-user", u);
    }
    if access.break_glass {
        rb = rb.header("x-tributary-break-glass", "true");
    }
    if !body.is_empty() {
        rb = rb
            .header("content-type", "application/fhir+json")
            .body(body);
    }
    let readiness = &st.rt.readiness;
    let unavailable = |e: reqwest::Error| {
        tracing::warn!(backend = %backend.cfg.name, timeout = e.is_timeout(), connect = e.is_connect(), "backend request failed");
        let kind = if e.is_timeout() {
            "no answer within timeout_secs"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        backend.record_reachable(readiness, Err(backend.unreachable_reason(kind)));
        if e.is_timeout() {
            ApiError::BackendTimeout(format!(
                "backend {} did not answer within its timeout_secs",
                backend.cfg.name
            ))
        } else {
            ApiError::Backend(format!("backend {} unavailable", backend.cfg.name))
        }
    };
    let res = rb.send().await.map_err(unavailable)?;
    let status = res.status();
    match read_limited(res, backend.cfg.max_response_bytes).await {
        Ok(bytes) => {
            backend.record_reachable(readiness, Ok(()));
            Ok((status, bytes))
        }
        Err(BodyError::Failed(e)) => Err(unavailable(e)),
        Err(too_large @ BodyError::TooLarge { .. }) => {
            tracing::warn!(backend = %backend.cfg.name, "backend response refused: larger than max_response_bytes");
            Err(ApiError::Backend(format!(
                "backend {}: {too_large}",
                backend.cfg.name
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::metadata_problem;
    use reqwest::StatusCode;

    #[test]
    fn a_metadata_answer_is_checked_for_an_r4_capability_statement() {
        let cap = |v: &str| {
            format!(r#"{{"resourceType":"CapabilityStatement","fhirVersion":"{v}"}}"#).into_bytes()
        };
        assert_eq!(metadata_problem(StatusCode::OK, &cap("4.0.1")), None);
        for (status, body, problem) in [
            (
                StatusCode::OK,
                cap("5.0.0"),
                "fhirVersion 5.0.0, not R4 (4.0.x)",
            ),
            (
                StatusCode::OK,
                cap("3.0.2"),
                "fhirVersion 3.0.2, not R4 (4.0.x)",
            ),
            (StatusCode::NOT_FOUND, cap("4.0.1"), "answered HTTP 404"),
            (
                StatusCode::OK,
                b"<html/>".to_vec(),
                "answered something that is not JSON",
            ),
            (
                StatusCode::OK,
                br#"{"resourceType":"Bundle"}"#.to_vec(),
                "answered JSON that is not a CapabilityStatement",
            ),
            (
                StatusCode::OK,
                br#"{"resourceType":"CapabilityStatement"}"#.to_vec(),
                "its CapabilityStatement has no fhirVersion",
            ),
        ] {
            assert_eq!(metadata_problem(status, &body).as_deref(), Some(problem));
        }
    }
}
