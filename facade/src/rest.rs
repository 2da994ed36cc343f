//! Instance and type interactions on the built-in store: read, vread, create (and conditional
//! create), update (with `If-Match`, and conditional update), delete, history, `$everything`,
//! and the auditor's `AuditEvent` search.

use crate::audit::{to_audit_event, AuditSlot, Disclosed};
use crate::capability::RESOURCE_TYPES;
use crate::error::{ApiError, ApiResult, FHIR_JSON};
use crate::policy::{patient_links, valid_id, Access, FhirRequest};
use crate::scopes::Perm;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use tributary_storage::{
    Precondition, ResourceWrite, StoreTransaction, StoredResource, WriteOp, WriteOutcome,
};

pub(crate) fn check_type(t: &str) -> ApiResult<()> {
    if RESOURCE_TYPES.binary_search(&t).is_ok() {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "resource type {t:?} is not supported"
        )))
    }
}

pub(crate) fn check_id(id: &str) -> ApiResult<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "a resource id is 1–64 of A-Z a-z 0-9 - .".into(),
        ))
    }
}

pub(crate) fn base_url(st: &AppState, headers: &HeaderMap) -> String {
    if !st.facade.cfg.base_url.is_empty() {
        return st.facade.cfg.base_url.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .unwrap_or("localhost");
    let scheme = if st.facade.https { "https" } else { "http" };
    format!("{scheme}://{host}/fhir")
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\"")).expect("ascii")
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    res
}

pub(crate) fn bundle_response(v: &Value) -> Response {
    json_response(StatusCode::OK, serde_json::to_vec(v).unwrap_or_default())
}

fn resource_response(status: StatusCode, r: &StoredResource) -> Response {
    let mut res = json_response(status, r.json.to_vec());
    validators(&mut res, r);
    res
}

/// `ETag` and `Last-Modified` (an HTTP-date, as HTTP and FHIR R4 §3.1.0.4 require).
fn validators(res: &mut Response, r: &StoredResource) {
    res.headers_mut().insert(header::ETAG, etag(r.version));
    let modified = u64::try_from(r.last_updated)
        .ok()
        .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
    if let Some(v) = modified.and_then(|t| HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok())
    {
        res.headers_mut().insert(header::LAST_MODIFIED, v);
    }
}

/// The validators of a conditional read, taken from the request without copying its other
/// headers (a read is the facade's hottest path).
pub struct Validators {
    none_match: Option<HeaderValue>,
    modified_since: Option<HeaderValue>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Validators {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Validators {
            none_match: parts.headers.get(header::IF_NONE_MATCH).cloned(),
            modified_since: parts.headers.get(header::IF_MODIFIED_SINCE).cloned(),
        })
    }
}

/// A conditional read (FHIR R4 §3.1.0.4.1): whether the caller's copy is still current, by
/// `If-None-Match` (the version's ETag, weak or strong, or `*`) or, only without it,
/// `If-Modified-Since` (at the one-second precision of an HTTP-date).
fn not_modified(headers: &Validators, r: &StoredResource) -> bool {
    if let Some(tags) = &headers.none_match {
        let Ok(tags) = tags.to_str() else {
            return false;
        };
        let version = r.version.to_string();
        return tags
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).trim_matches('"') == version);
    }
    let since = headers
        .modified_since
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    since.is_some_and(|s| {
        let whole_seconds = r.last_updated.div_euclid(1000) * 1000;
        i64::try_from(s.as_millis()).is_ok_and(|s| whole_seconds <= s)
    })
}

/// What a write answers with, from `Prefer: return=…` (FHIR R4 RESTful API, "Managing Return
/// Content"): the resource as stored (the default), nothing, or an OperationOutcome about the
/// write. Headers (`Location`, `ETag`) are the same for all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Return {
    Representation,
    Minimal,
    Outcome,
}

impl Return {
    pub(crate) fn of(headers: &HeaderMap) -> Return {
        headers
            .get_all("prefer")
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|h| h.split([',', ';']))
            .filter_map(|p| p.trim().strip_prefix("return="))
            .find_map(|v| match v.trim_matches('"') {
                "representation" => Some(Return::Representation),
                "minimal" => Some(Return::Minimal),
                "OperationOutcome" => Some(Return::Outcome),
                _ => None,
            })
            .unwrap_or(Return::Representation)
    }

    /// The OperationOutcome that stands for a write's resource: what happened, by id only.
    pub(crate) fn outcome(verb: &str, rtype: &str, id: &str, version: u64) -> Value {
        crate::error::operation_outcome(
            "information",
            "informational",
            &format!("{verb} {rtype}/{id} version {version}"),
        )
    }

    /// A write's answer with the body this preference asks for (`json`: the stored resource),
    /// saying which one it applied.
    fn respond(self, status: StatusCode, json: &[u8], outcome: impl FnOnce() -> Value) -> Response {
        let (mut res, applied) = match self {
            Return::Representation => (json_response(status, json.to_vec()), None),
            Return::Minimal => {
                let mut res = Response::new(Body::empty());
                *res.status_mut() = status;
                (res, Some("return=minimal"))
            }
            Return::Outcome => (
                json_response(status, serde_json::to_vec(&outcome()).unwrap_or_default()),
                Some("return=OperationOutcome"),
            ),
        };
        if let Some(a) = applied {
            res.headers_mut()
                .insert("preference-applied", HeaderValue::from_static(a));
        }
        res
    }
}

/// What a write did, for its OperationOutcome.
pub(crate) fn written(w: &WriteOutcome) -> &'static str {
    match (w.created, w.changed) {
        (true, _) => "created",
        (false, true) => "updated",
        (false, false) => "unchanged",
    }
}

fn write_response(base: &str, w: &WriteOutcome, ret: Return) -> Response {
    let status = if w.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut res = ret.respond(status, &w.json, || {
        Return::outcome(written(w), &w.resource_type, &w.id, w.version)
    });
    let h = res.headers_mut();
    h.insert(header::ETAG, etag(w.version));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{base}/{}/{}/_history/{}",
        w.resource_type, w.id, w.version
    )) {
        h.insert(header::LOCATION, v.clone());
        h.insert(header::CONTENT_LOCATION, v);
    }
    res
}

/// Names the resource's patient on the request's record, unless it names one already. A resource
/// in more than one patient's compartment (an Appointment with two patients among its
/// participants) is in each of their reports: the others get disclosure records.
pub(crate) fn note_patient(slot: &AuditSlot, rtype: &str, id: &str, resource: &Value) {
    let mut links = patient_links(rtype, id, resource);
    links.retain(|p| crate::policy::valid_id(p));
    if links.is_empty() {
        return;
    }
    slot.update(|d| {
        if d.patient.is_none() {
            // the token's own patient when the resource is in its compartment, else the first
            let own = d.context_patient.as_ref().filter(|c| links.contains(c));
            d.patient = Some(own.unwrap_or(&links[0]).clone());
        }
    });
    if links.len() > 1 {
        let mut seen = Disclosed::default();
        seen.add(rtype, id, resource);
        slot.disclose(seen);
    }
}

/// Reads the current version and checks the caller may see it. 404, 410 or 403 otherwise.
pub(crate) fn read_visible(
    st: &AppState,
    access: &Access,
    rtype: &str,
    id: &str,
    slot: &AuditSlot,
) -> ApiResult<(StoredResource, Value)> {
    check_type(rtype)?;
    check_id(id)?;
    let tenant = &access.principal.tenant;
    let stored = st
        .rt
        .store
        .read(tenant, rtype, id)?
        .ok_or_else(|| ApiError::NotFound(format!("{rtype}/{id} not found")))?;
    if stored.deleted {
        return Err(ApiError::Gone(format!("{rtype}/{id} was deleted")));
    }
    let v = stored.resource()?;
    note_patient(slot, rtype, id, &v);
    access.require(Perm::Read, rtype, id, &v)?;
    Ok((stored, v))
}

pub async fn read(
    State(st): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: Validators,
) -> ApiResult<Response> {
    let subset = match query {
        Some(q) => {
            crate::subset::Subset::from_params(&rtype, &crate::policy::decode_query(Some(&q)))?
        }
        None => None,
    };
    let (stored, mut v) = read_visible(&st, &access, &rtype, &id, &slot)?;
    if not_modified(&headers, &stored) {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        validators(&mut res, &stored);
        return Ok(res);
    }
    let Some(subset) = subset else {
        return Ok(resource_response(StatusCode::OK, &stored));
    };
    subset.apply(&rtype, &mut v);
    let mut res = json_response(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default());
    validators(&mut res, &stored);
    Ok(res)
}

pub async fn vread(
    State(st): State<AppState>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    check_id(&id)?;
    let version: u64 = vid
        .parse()
        .map_err(|_| ApiError::BadRequest("version id must be a number".into()))?;
    let tenant = &access.principal.tenant;
    // Authorize against the current version too: a resource's compartment is decided by what it
    // is now and what it was then; both must be visible.
    let stored = st
        .rt
        .store
        .vread(tenant, &rtype, &id, version)?
        .ok_or_else(|| ApiError::NotFound(format!("{rtype}/{id} version {version} not found")))?;
    if stored.deleted {
        return Err(ApiError::Gone(format!(
            "{rtype}/{id} version {version} is a deletion"
        )));
    }
    let v = stored.resource()?;
    note_patient(&slot, &rtype, &id, &v);
    access.require(Perm::Read, &rtype, &id, &v)?;
    if let Some(current) = st
        .rt
        .store
        .read(tenant, &rtype, &id)?
        .filter(|c| !c.deleted && c.version != version)
    {
        access.require(Perm::Read, &rtype, &id, &current.resource()?)?;
    }
    Ok(resource_response(StatusCode::OK, &stored))
}

fn parse_body(body: &[u8], rtype: &str) -> ApiResult<Value> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body is not JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    check_resource(&v, rtype)?;
    Ok(v)
}

/// Structural checks every stored resource must pass.
pub(crate) fn check_resource(v: &Value, rtype: &str) -> ApiResult<()> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::BadRequest("body must be a JSON object".into()))?;
    match obj.get("resourceType").and_then(Value::as_str) {
        None => return Err(ApiError::BadRequest("resourceType is missing".into())),
        Some(t) if t != rtype => {
            return Err(ApiError::BadRequest(format!(
                "resourceType {t:?} does not match the URL type {rtype:?}"
            )))
        }
        _ => {}
    }
    if let Some(id) = obj.get("id") {
        if !id.as_str().is_some_and(valid_id) {
            return Err(ApiError::Unprocessable(
                "id must be 1–64 of A-Z a-z 0-9 - .".into(),
            ));
        }
    }
    if obj.get("meta").is_some_and(|m| !m.is_object()) {
        return Err(ApiError::Unprocessable("meta must be an object".into()));
    }
    if crate::subset::is_subsetted(v) {
        return Err(ApiError::Unprocessable(
            "the resource is tagged SUBSETTED (a part of one, from _elements or _summary): write the whole resource".into(),
        ));
    }
    if obj.get("text").is_some_and(|m| !m.is_object()) {
        return Err(ApiError::Unprocessable(
            "text must be a Narrative object".into(),
        ));
    }
    check_elements(rtype, v)
}

/// A resource against the FHIR R4 element table, at every level
/// ([`tributary_core::fhir_r4::check_resource`]): 422 names the path and element, never a value.
fn check_elements(rtype: &str, v: &Value) -> ApiResult<()> {
    if !tributary_core::fhir_r4::is_resource(rtype) {
        return Ok(());
    }
    tributary_core::fhir_r4::check_resource(rtype, v).map_err(ApiError::Unprocessable)
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub(crate) fn if_match(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    parse_etag(s)
        .map(Some)
        .ok_or_else(|| ApiError::BadRequest("If-Match must be W/\"<version>\"".into()))
}

pub(crate) fn parse_etag(s: &str) -> Option<u64> {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

/// Resolves a conditional (`identifier=…`, `_id=…`) to the matching resources the caller may
/// act on with `perm` (the operation's: create, update, delete). Matches outside the caller's
/// access count as no match: answering 403 or 412 for them would tell a patient-context token
/// whether some other patient's resource with that identifier exists.
pub(crate) fn conditional_matches(
    st: &AppState,
    access: &Access,
    rtype: &str,
    query: &str,
    perm: Perm,
) -> ApiResult<Vec<StoredResource>> {
    let params = crate::policy::decode_query(Some(query.trim_start_matches('?')));
    if params.is_empty() {
        return Err(ApiError::BadRequest(
            "a conditional operation needs search parameters".into(),
        ));
    }
    let res = crate::search::run_search(st, access, rtype, &params, perm)?;
    Ok(res.matches)
}

/// The one resource a conditional update or delete (`perm`) targets: `None` when nothing the
/// caller may act on matches, 412 when several do, 400 without search parameters.
fn single_match(
    st: &AppState,
    access: &Access,
    rtype: &str,
    req: &FhirRequest,
    perm: Perm,
    operation: &str,
) -> ApiResult<Option<StoredResource>> {
    let verb = if perm == Perm::Delete {
        "DELETE"
    } else {
        "PUT"
    };
    if !access.may(perm, rtype) {
        return Err(ApiError::out_of_scope());
    }
    if req.params.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{verb} on a type needs search parameters ({operation})"
        )));
    }
    let query: Vec<String> = req.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut found = conditional_matches(st, access, rtype, &query.join("&"), perm)?;
    if found.len() > 1 {
        return Err(ApiError::PreconditionFailed(
            "the condition matched more than one resource".into(),
        ));
    }
    Ok(found.pop())
}

pub async fn create(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    let mut v = parse_body(&body, &rtype)?;
    let base = base_url(&st, &headers);
    if let Some(cond) = headers.get("if-none-exist").and_then(|h| h.to_str().ok()) {
        let found = conditional_matches(&st, &access, &rtype, cond, Perm::Create)?;
        match found.len() {
            0 => {}
            1 => {
                let existing = &found[0];
                let ev = existing.resource()?;
                note_patient(&slot, &rtype, &existing.id, &ev);
                slot.update(|d| d.resource_id = Some(existing.id.clone()));
                access.require(Perm::Read, &rtype, &existing.id, &ev)?;
                let ret = Return::of(&headers);
                let mut res = ret.respond(StatusCode::OK, &existing.json, || {
                    Return::outcome(
                        "found (If-None-Exist)",
                        &rtype,
                        &existing.id,
                        existing.version,
                    )
                });
                validators(&mut res, existing);
                return Ok(res);
            }
            _ => {
                return Err(ApiError::PreconditionFailed(
                    "If-None-Exist matched more than one resource".into(),
                ))
            }
        }
    }
    let id = new_id();
    v["id"] = Value::String(id.clone());
    crate::subscription::stamp_if_subscription(&access, &rtype, &mut v);
    note_patient(&slot, &rtype, &id, &v);
    slot.update(|d| d.resource_id = Some(id.clone()));
    access.require(Perm::Create, &rtype, &id, &v)?;
    let mut w = ResourceWrite::upsert(&rtype, &id, v);
    w.precondition = Precondition::MustNotExist;
    let out = commit_one(&st, &access, w).await?;
    Ok(write_response(&base, &out, Return::of(&headers)))
}

pub(crate) async fn commit_one(
    st: &AppState,
    access: &Access,
    w: ResourceWrite,
) -> ApiResult<WriteOutcome> {
    let tx = StoreTransaction {
        tenant: access.principal.tenant.clone(),
        writes: vec![w],
        ..Default::default()
    };
    let mut out = st.rt.store.commit(tx).await?;
    out.writes
        .pop()
        .ok_or_else(|| ApiError::Internal("commit returned no write".into()))
}

/// Checks an update of `rtype/id` to `v`: the caller may update, and both the stored version
/// (if any) and the new one are within its access.
pub(crate) fn check_update(
    st: &AppState,
    access: &Access,
    rtype: &str,
    id: &str,
    v: &Value,
    slot: Option<&AuditSlot>,
) -> ApiResult<bool> {
    let current = st.rt.store.read(&access.principal.tenant, rtype, id)?;
    let exists = current.as_ref().is_some_and(|c| !c.deleted);
    if let Some(c) = current.as_ref().filter(|c| !c.deleted) {
        let cv = c.resource()?;
        if let Some(slot) = slot {
            note_patient(slot, rtype, id, &cv);
        }
        access.require(Perm::Update, rtype, id, &cv)?;
    }
    let perm = if exists { Perm::Update } else { Perm::Create };
    access.require(perm, rtype, id, v)?;
    Ok(exists)
}

pub async fn update(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    check_id(&id)?;
    let v = parse_body(&body, &rtype)?;
    match v.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id != id => {
            return Err(ApiError::BadRequest(
                "the body's id does not match the URL".into(),
            ))
        }
        Some(_) => {}
        None => {
            return Err(ApiError::BadRequest(
                "an update must carry the resource id in the body".into(),
            ))
        }
    }
    store_update(&st, &headers, &access, &slot, &rtype, &id, v).await
}

/// `PUT /fhir/{type}?identifier=…`: update the one match, create when none, 412 when several.
pub async fn conditional_update(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    let v = parse_body(&body, &rtype)?;
    let found = single_match(
        &st,
        &access,
        &rtype,
        &req,
        Perm::Update,
        "conditional update",
    )?;
    let id = match found {
        None => v
            .get("id")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(new_id),
        Some(one) => one.id,
    };
    if v.get("id").and_then(Value::as_str).is_some_and(|b| b != id) {
        return Err(ApiError::BadRequest(
            "the body's id does not match the resource the condition found".into(),
        ));
    }
    slot.update(|d| d.resource_id = Some(id.clone()));
    store_update(&st, &headers, &access, &slot, &rtype, &id, v).await
}

/// The shared end of `update` and conditional update: the body takes the target id, the
/// write is checked against scopes and compartment, and `If-Match` becomes a version
/// precondition on the one atomic commit.
async fn store_update(
    st: &AppState,
    headers: &HeaderMap,
    access: &Access,
    slot: &AuditSlot,
    rtype: &str,
    id: &str,
    mut v: Value,
) -> ApiResult<Response> {
    v["id"] = Value::String(id.to_string());
    crate::subscription::stamp_if_subscription(access, rtype, &mut v);
    note_patient(slot, rtype, id, &v);
    check_update(st, access, rtype, id, &v, Some(slot))?;
    let mut w = ResourceWrite::upsert(rtype, id, v);
    if let Some(version) = if_match(headers)? {
        w.precondition = Precondition::VersionMatch(version);
    }
    let out = commit_one(st, access, w).await?;
    Ok(write_response(
        &base_url(st, headers),
        &out,
        Return::of(headers),
    ))
}

pub async fn delete(
    State(st): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    check_id(&id)?;
    if let Some(c) = st
        .rt
        .store
        .read(&access.principal.tenant, &rtype, &id)?
        .filter(|c| !c.deleted)
    {
        let cv = c.resource()?;
        note_patient(&slot, &rtype, &id, &cv);
        access.require(Perm::Delete, &rtype, &id, &cv)?;
    }
    let w = ResourceWrite::delete(&rtype, &id);
    commit_one(&st, &access, w).await?;
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    Ok(res)
}

/// `DELETE /fhir/{type}?identifier=…`: no match → 204 (an ordinary delete of nothing, as R4
/// says), one match → that resource is deleted (204), several → 412. Only resources the caller
/// may delete match (a token without delete scope for the type gets 403).
pub async fn conditional_delete(
    State(st): State<AppState>,
    Path(rtype): Path<String>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    let target = single_match(
        &st,
        &access,
        &rtype,
        &req,
        Perm::Delete,
        "conditional delete",
    )?;
    if let Some(c) = &target {
        let cv = c.resource()?;
        slot.update(|d| d.resource_id = Some(c.id.clone()));
        note_patient(&slot, &rtype, &c.id, &cv);
        access.require(Perm::Delete, &rtype, &c.id, &cv)?;
        // Deletes exactly the version that matched: a concurrent change makes this a 412.
        let w = ResourceWrite {
            resource_type: rtype.clone(),
            id: c.id.clone(),
            op: WriteOp::Delete,
            precondition: Precondition::VersionMatch(c.version),
        };
        commit_one(&st, &access, w).await?;
    }
    slot.update(|d| d.returned = Some(usize::from(target.is_some())));
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    Ok(res)
}

/// A patch document, by its form.
pub(crate) enum PatchBody<'a> {
    /// JSON Patch (RFC 6902): an array of operations.
    Json(&'a Value),
    /// FHIRPath Patch: a `Parameters` resource.
    FhirPath(&'a Value),
}

/// `current` (resource `rtype/id`) with `patch` applied, checked like an update's body: 400 for
/// a malformed patch, 422 when it does not apply or its result is not an acceptable resource or
/// no longer this one. `meta.versionId`/`lastUpdated` are left to the store.
pub(crate) fn patched_resource(
    current: &Value,
    rtype: &str,
    id: &str,
    patch: PatchBody<'_>,
) -> ApiResult<Value> {
    let applied = match patch {
        PatchBody::Json(ops) => crate::patch::apply(current, ops),
        PatchBody::FhirPath(params) => crate::fhirpatch::apply(current, rtype, params),
    };
    let mut patched = applied.map_err(|e| match e {
        crate::patch::PatchError::Malformed(_) => ApiError::BadRequest(e.to_string()),
        crate::patch::PatchError::NotApplicable(_) => ApiError::Unprocessable(e.to_string()),
    })?;
    check_resource(&patched, rtype).map_err(|e| {
        ApiError::Unprocessable(format!(
            "the patched resource is invalid: {}",
            e.public_message()
        ))
    })?;
    if patched.get("id").and_then(Value::as_str) != Some(id) {
        return Err(ApiError::Unprocessable(
            "the patch must not change or remove the resource id".into(),
        ));
    }
    if let Some(meta) = patched.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
    }
    Ok(patched)
}

/// `PATCH /fhir/{type}/{id}` with a JSON Patch (`application/json-patch+json`) or a FHIRPath
/// Patch `Parameters` (`application/fhir+json`): the patch is applied to the current version,
/// the result checked like an update (structure, id, scopes, compartment) and committed only if
/// the resource is still at the version patched (or the `If-Match` one). 400 for a bad patch
/// document, 412 for a version mismatch, 422 when the patch does not apply or its result is not
/// an acceptable resource.
pub async fn patch(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    check_id(&id)?;
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let json_patch = match media.as_str() {
        "application/json-patch+json" => true,
        "application/fhir+json" | "application/json" => false,
        _ => {
            return Err(ApiError::BadRequest(
                "PATCH takes a JSON Patch (Content-Type: application/json-patch+json) or a FHIRPath Patch Parameters (Content-Type: application/fhir+json)".into(),
            ))
        }
    };
    let doc: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body is not JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let stored = st
        .rt
        .store
        .read(&access.principal.tenant, &rtype, &id)?
        .ok_or_else(|| ApiError::NotFound(format!("{rtype}/{id} not found")))?;
    if stored.deleted {
        return Err(ApiError::Gone(format!("{rtype}/{id} was deleted")));
    }
    let current = stored.resource()?;
    note_patient(&slot, &rtype, &id, &current);
    access.require(Perm::Update, &rtype, &id, &current)?;
    let expected = match if_match(&headers)? {
        Some(v) if v != stored.version => {
            return Err(ApiError::PreconditionFailed(format!(
                "version conflict: If-Match expected version {v}, current is {}",
                stored.version
            )))
        }
        Some(v) => v,
        None => stored.version,
    };
    let body = if json_patch {
        PatchBody::Json(&doc)
    } else {
        PatchBody::FhirPath(&doc)
    };
    let mut patched = patched_resource(&current, &rtype, &id, body)?;
    crate::subscription::stamp_if_subscription(&access, &rtype, &mut patched);
    note_patient(&slot, &rtype, &id, &patched);
    check_update(&st, &access, &rtype, &id, &patched, None)?;
    let mut w = ResourceWrite::upsert(&rtype, &id, patched);
    w.precondition = Precondition::VersionMatch(expected);
    let out = commit_one(&st, &access, w).await?;
    Ok(write_response(
        &base_url(&st, &headers),
        &out,
        Return::of(&headers),
    ))
}

fn history_entry(base: &str, r: &StoredResource) -> ApiResult<Value> {
    let url = format!("{}/{}", r.resource_type, r.id);
    let mut e = json!({
        "fullUrl": format!("{base}/{url}"),
        "request": {"method": if r.deleted { "DELETE" } else if r.version == 1 { "POST" } else { "PUT" }, "url": if r.version == 1 && !r.deleted { r.resource_type.clone() } else { url }},
        "response": {"status": if r.deleted { "204" } else if r.version == 1 { "201" } else { "200" }, "etag": format!("W/\"{}\"", r.version), "lastModified": tributary_core::format_rfc3339_millis(r.last_updated)},
    });
    if !r.deleted {
        e["resource"] = r.resource()?;
    }
    Ok(e)
}

fn history_bundle(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries})
}

/// `GET /fhir/{type}/{id}/_history` and `GET /fhir/Patient/{id}/$everything`.
pub async fn instance_op(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((rtype, id, op)): Path<(String, String, String)>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
) -> ApiResult<Response> {
    let base = base_url(&st, &headers);
    match op.as_str() {
        "_history" => {
            check_type(&rtype)?;
            check_id(&id)?;
            let versions = st.rt.store.history(&access.principal.tenant, &rtype, &id)?;
            if versions.is_empty() {
                return Err(ApiError::NotFound(format!("{rtype}/{id} not found")));
            }
            // Every version must be visible: moving a resource between patients must not let
            // either see the other's versions.
            let mut entries = Vec::new();
            let mut seen = Disclosed::default();
            for r in &versions {
                if r.deleted {
                    entries.push(history_entry(&base, r)?);
                    continue;
                }
                let v = r.resource()?;
                note_patient(&slot, &rtype, &id, &v);
                access.require(Perm::Read, &rtype, &id, &v)?;
                seen.add(&rtype, &id, &v);
                entries.push(history_entry(&base, r)?);
            }
            slot.disclose(seen);
            slot.update(|d| d.returned = Some(entries.len()));
            Ok(bundle_response(&history_bundle(entries)))
        }
        "$everything" if rtype == "Patient" => {
            let (patient, _) = read_visible(&st, &access, "Patient", &id, &slot)?;
            let filter = crate::everything::Filter::parse(&req)?;
            let count = req
                .param("_count")
                .and_then(|c| c.parse::<usize>().ok())
                .unwrap_or(1000)
                .clamp(1, 5000);
            // Pages follow each other by `_offset` into the compartment's resources (type, id
            // order); the Patient itself opens the first page.
            let offset = match req.param("_offset") {
                Some(o) => o
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest("_offset must be a number".into()))?,
                None => 0,
            };
            let mut entries = Vec::new();
            let patient = patient.resource()?;
            let with_patient = filter.admits("Patient", &patient);
            // The Patient opens the first page, on top of `count`.
            let first = usize::from(offset == 0 && with_patient);
            if first == 1 {
                entries.push(json!({"fullUrl": format!("{base}/Patient/{id}"), "resource": patient, "search": {"mode": "match"}}));
            }
            let tenant = &access.principal.tenant;
            let mut total = usize::from(with_patient);
            let mut listed = 0usize;
            // Resources in this patient's compartment may be in another's too.
            let mut seen = Disclosed::default();
            for (t, rid) in st.rt.store.ids_by_patient(tenant, &id, None)? {
                if t == "Patient" || !filter.wants(&t) {
                    continue;
                }
                let Some(r) = st.rt.store.read(tenant, &t, &rid)? else {
                    continue;
                };
                if r.deleted {
                    continue;
                }
                let v = r.resource()?;
                if !access.permits(Perm::Read, &t, &rid, &v) || !filter.admits(&t, &v) {
                    continue;
                }
                total += 1;
                listed += 1;
                if listed > offset && entries.len() < count + first {
                    seen.add(&t, &rid, &v);
                    entries.push(json!({"fullUrl": format!("{base}/{t}/{rid}"), "resource": v, "search": {"mode": "match"}}));
                }
            }
            let page = |o: usize| {
                let set = [("_offset", o.to_string()), ("_count", count.to_string())];
                let set: Vec<(&str, &str)> = set.iter().map(|(k, v)| (*k, v.as_str())).collect();
                format!(
                    "{base}/Patient/{id}/$everything?{}",
                    crate::search::link_query_set(&req.params, &set)
                )
            };
            let mut links = vec![json!({"relation": "self", "url": page(offset)})];
            // the next offset: what this page showed of the compartment (the Patient aside)
            let shown = offset + entries.len() - first;
            if shown < listed {
                links.push(json!({"relation": "next", "url": page(shown)}));
            }
            let mut complete = true;
            if offset == 0 {
                let from_backends =
                    everything_from_backends(&st, &access, &slot, &id, count, &filter).await;
                for (rtype, resource) in from_backends.resources {
                    let rid = resource["id"].as_str().unwrap_or_default().to_string();
                    seen.add(&rtype, &rid, &resource);
                    total += 1;
                    entries.push(json!({"fullUrl": format!("{base}/{rtype}/{rid}"), "resource": resource, "search": {"mode": "match"}}));
                }
                // Never a silently shorter answer: what a backend could not give is named.
                if !from_backends.missing.is_empty() {
                    complete = false;
                    entries.push(crate::search::incomplete_entry(&format!(
                        "not all in this answer: {}",
                        from_backends.missing.join("; ")
                    )));
                }
            }
            slot.disclose(seen);
            slot.update(|d| d.returned = Some(entries.len()));
            let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": total, "link": links, "entry": entries});
            if let (false, Some(b)) = (complete, bundle.as_object_mut()) {
                b.remove("total");
            }
            Ok(bundle_response(&bundle))
        }
        _ => Err(ApiError::NotFound(format!("unknown operation {op:?}"))),
    }
}

/// What the backend FHIR servers add to a patient's `$everything`.
#[derive(Default)]
struct BackendCompartment {
    /// `(type, resource)` the caller may read.
    resources: Vec<(String, Value)>,
    /// Per routed type that is not all here, why (`Observation (lab): backend lab unavailable`).
    missing: Vec<String>,
}

/// The patient's resources of each type a backend serves for the tenant, asked of all of them
/// at once (at most `count` per type). Types without a patient link (`Practitioner`) are not in
/// a compartment, as in the store's part; types the caller may not read are not asked.
async fn everything_from_backends(
    st: &AppState,
    access: &Access,
    slot: &AuditSlot,
    pid: &str,
    count: usize,
    filter: &crate::everything::Filter,
) -> BackendCompartment {
    let tenant = &access.principal.tenant;
    let backends = &st.facade.backends;
    let asked: Vec<(&str, &crate::backend::Backend)> = backends
        .routed_types(tenant)
        .into_iter()
        .filter(|(t, _)| {
            *t != "Patient"
                && (crate::search::supports(t, "patient") || crate::search::supports(t, "subject"))
                && access.may(Perm::Read, t)
                && filter.wants(t)
        })
        .filter_map(|(t, _)| backends.route(tenant, t).map(|b| (t, b)))
        .collect();
    if asked.is_empty() {
        return BackendCompartment::default();
    }
    crate::backend::note_backends(slot, asked.iter().map(|(_, b)| b.cfg.name.as_str()));
    let answers = futures_util::future::join_all(asked.iter().map(|(t, b)| {
        crate::backend::compartment_search(st, b, access, slot, t, pid, count, filter)
    }))
    .await;
    let mut out = BackendCompartment::default();
    for ((t, b), answer) in asked.into_iter().zip(answers) {
        let name = &b.cfg.name;
        match answer {
            Ok(part) => {
                if let Some(why) = part.more {
                    out.missing.push(format!(
                        "{t} ({name}): {why}; search them by patient (GET /fhir/{t}?patient={pid})"
                    ));
                }
                out.resources
                    .extend(part.resources.into_iter().map(|r| (t.to_string(), r)));
            }
            Err(e) => out
                .missing
                .push(format!("{t} ({name}): {}", e.public_message())),
        }
    }
    out
}

/// `GET /fhir/{type}/_history[?_since=…&_count=…]`
pub async fn history_type(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    let since = match req.param("_since") {
        Some(s) => Some(
            tributary_core::parse_rfc3339_millis(s)
                .ok_or_else(|| ApiError::BadRequest("_since must be an instant".into()))?,
        ),
        None => None,
    };
    let count = req
        .param("_count")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let after = match req.param("_cursor") {
        Some(c) => Some(parse_history_cursor(c).ok_or_else(|| {
            ApiError::BadRequest("_cursor is not one of this server's history links".into())
        })?),
        None => None,
    };
    let base = base_url(&st, &headers);
    let narrowed = access.compartment_for(Perm::Search, &rtype).is_some();
    let mut entries = Vec::new();
    let mut seen = Disclosed::default();
    // Read more than asked: versions the caller may not see are dropped, not counted.
    let read = count * 4 + 100;
    let versions = st.rt.store.history_type(
        &access.principal.tenant,
        &rtype,
        since,
        after.as_ref(),
        read,
    )?;
    let more_stored = versions.len() == read;
    let mut last = None;
    let mut full = false;
    for r in &versions {
        if entries.len() >= count {
            full = true;
            break;
        }
        last = Some(tributary_storage::HistoryPosition::of(r));
        if r.deleted {
            if !narrowed && access.may(Perm::Search, &rtype) {
                entries.push(history_entry(&base, r)?);
            }
            continue;
        }
        let v = r.resource()?;
        if access.permits(Perm::Search, &rtype, &r.id, &v) {
            seen.add(&rtype, &r.id, &v);
            entries.push(history_entry(&base, r)?);
        }
    }
    slot.disclose(seen);
    slot.update(|d| d.returned = Some(entries.len()));
    // The next page starts after the last version looked at (seen or not): nothing is
    // skipped, nothing comes twice. Its total is unknown, so a paged Bundle has none.
    let next = last.filter(|_| full || more_stored);
    let mut bundle = history_bundle(entries);
    let count = count.to_string();
    let self_query = crate::search::link_query_set(&req.params, &[("_count", &count)]);
    let mut links =
        vec![json!({"relation": "self", "url": format!("{base}/{rtype}/_history?{self_query}")})];
    if let Some(p) = next {
        let cursor = format!("{}.{}.{}", p.last_updated, p.version, p.id);
        let next_query =
            crate::search::link_query_set(&req.params, &[("_cursor", &cursor), ("_count", &count)]);
        links.push(
            json!({"relation": "next", "url": format!("{base}/{rtype}/_history?{next_query}")}),
        );
        if let Some(o) = bundle.as_object_mut() {
            o.remove("total");
        }
    }
    bundle["link"] = Value::Array(links);
    Ok(bundle_response(&bundle))
}

/// A `_cursor` of a type history `next` link: `<ms>.<version>.<id>`.
fn parse_history_cursor(c: &str) -> Option<tributary_storage::HistoryPosition> {
    let mut it = c.splitn(3, '.');
    let last_updated = it.next()?.parse().ok()?;
    let version = it.next()?.parse().ok()?;
    let id = it
        .next()
        .filter(|i| crate::policy::valid_id(i))?
        .to_string();
    Some(tributary_storage::HistoryPosition {
        last_updated,
        id,
        version,
    })
}

/// `GET /fhir/AuditEvent?patient=&date=ge…&date=le…&agent=&entity=&type=&subtype=&action=&outcome=&_count=`:
/// the caller's tenant's audit trail as AuditEvents, oldest first, for the audit role. Pages
/// of `_count` (default 1000, at most 5000; 0 for the total only) follow each other
/// through a `next` link whose `_cursor` is the (time, sequence number) of the page's last
/// record, so a report over any window can be read to its end without rescanning it. The first
/// page's `total` counts every match; later pages carry none (counting would mean rescanning
/// from the start).
pub async fn audit_events(
    State(st): State<AppState>,
    headers: HeaderMap,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
) -> ApiResult<Response> {
    let mut patient = None;
    let mut agent = None;
    let mut entity = None;
    // (JSON pointer into the rendered AuditEvent, wanted code)
    let mut rendered: Vec<(&'static str, String)> = Vec::new();
    let mut cursor: Option<(i64, u64)> = None;
    let mut from = i64::MIN;
    let mut to = i64::MAX;
    let mut count = 1000usize;
    // A token's code, with or without its `system|`.
    let code = |v: &str| v.rsplit_once('|').map_or(v, |(_, c)| c).to_string();
    for (k, v) in &req.params {
        match k.as_str() {
            "patient" => patient = Some(v.strip_prefix("Patient/").unwrap_or(v).to_string()),
            "agent" => agent = Some(v.clone()),
            "entity" => entity = Some(v.clone()),
            "type" => rendered.push(("/type/code", code(v))),
            "subtype" => rendered.push(("/subtype/0/code", code(v))),
            "action" => rendered.push(("/action", code(v))),
            "outcome" => rendered.push(("/outcome", code(v))),
            "_count" => {
                count = v
                    .parse()
                    .map_err(|_| ApiError::BadRequest("_count must be a number".into()))?
            }
            "_cursor" => {
                cursor = Some(
                    v.split_once(':')
                        .and_then(|(t, s)| Some((t.parse().ok()?, s.parse().ok()?)))
                        .ok_or_else(|| {
                            ApiError::BadRequest(
                                "_cursor is not one this server handed out in a next link".into(),
                            )
                        })?,
                )
            }
            "date" => {
                let (prefix, val) = v.split_at(v.len().min(2));
                let (lo, hi) = crate::search::date_range(val).ok_or_else(|| {
                    ApiError::BadRequest("date must be ge<date> or le<date>".into())
                })?;
                match prefix {
                    "ge" => from = from.max(lo),
                    "gt" => from = from.max(hi),
                    "le" => to = to.min(hi),
                    "lt" => to = to.min(lo),
                    _ => {
                        return Err(ApiError::BadRequest(
                            "date must be ge<date>, gt, le or lt".into(),
                        ))
                    }
                }
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unsupported AuditEvent parameter {other:?}"
                )))
            }
        }
    }
    let tenant = access.principal.tenant.clone();
    let log = st.rt.audit.clone();
    // `_count=0`: the total only.
    let count = count.min(5000);
    // Through the audit index (patient or time window), off the async workers; a log whose
    // index is not built yet is scanned.
    let page = tokio::task::spawn_blocking(move || -> ApiResult<AuditPage> {
        let mut page = AuditPage::default();
        // Keeps going while a match may still be needed: the first page counts every match for
        // its total; a later one stops at the first match past the page, which proves a next.
        let mut consider = |e: &tributary_storage::AuditEntry| -> bool {
            let b = &e.body;
            let s = |k: &str| b.get(k).and_then(Value::as_str);
            let t = tributary_storage::record_time(b).unwrap_or(0);
            if s("tenant") != Some(tenant.as_str()) || t < from || t >= to {
                return true;
            }
            if cursor.is_some_and(|c| (t, e.seq) <= c) {
                return true;
            }
            if patient.as_deref().is_some_and(|p| s("patient") != Some(p)) {
                return true;
            }
            // A request's client or user, or the partner a message came from or went to.
            if agent.as_deref().is_some_and(|a| {
                s("client") != Some(a) && s("user") != Some(a) && s("partner") != Some(a)
            }) {
                return true;
            }
            if let Some(ent) = entity.as_deref() {
                let what = format!(
                    "{}/{}",
                    s("resource_type").unwrap_or(""),
                    s("resource_id").unwrap_or("")
                );
                if what != ent {
                    return true;
                }
            }
            let mut event = None;
            if !rendered.is_empty() {
                let ev = to_audit_event(e);
                if rendered
                    .iter()
                    .any(|(at, want)| ev.pointer(at).and_then(Value::as_str) != Some(want.as_str()))
                {
                    return true;
                }
                event = Some(ev);
            }
            page.total += 1;
            if page.events.len() < count {
                page.events.push(event.unwrap_or_else(|| to_audit_event(e)));
                page.last = Some((t, e.seq));
            }
            cursor.is_none() || page.total <= count
        };
        let q = tributary_storage::AuditQuery {
            tenant: tenant.clone(),
            patient: patient.clone(),
            from_ms: cursor.map_or(from, |(t, _)| from.max(t)),
            to_ms: to,
        };
        log.query(&q, |e| consider(&e))?;
        Ok(page)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    slot.update(|d| d.returned = Some(page.events.len()));
    let base = base_url(&st, &headers);
    let mut links = vec![
        json!({"relation": "self", "url": format!("{base}/AuditEvent?{}", crate::search::link_query_with(&req.params, "_count", &count.to_string()))}),
    ];
    if let Some((t, seq)) = page.last.filter(|_| page.total > page.events.len()) {
        let (count, cursor) = (count.to_string(), format!("{t}:{seq}"));
        let next =
            crate::search::link_query_set(&req.params, &[("_count", &count), ("_cursor", &cursor)]);
        links.push(json!({"relation": "next", "url": format!("{base}/AuditEvent?{next}")}));
    }
    let entries: Vec<Value> = page
        .events
        .into_iter()
        .map(|r| json!({"resource": r, "search": {"mode": "match"}}))
        .collect();
    let mut bundle =
        json!({"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries});
    if cursor.is_none() {
        bundle["total"] = json!(page.total);
    }
    Ok(bundle_response(&bundle))
}

/// One page of an AuditEvent search: its events, how many matched from the cursor on, and where
/// the page ended.
#[derive(Default)]
struct AuditPage {
    events: Vec<Value>,
    total: usize,
    last: Option<(i64, u64)>,
}

/// `POST /admin/consent/{id}/revoke` (admin role): the caller's tenant's tokens carrying
/// `grant = id` (or `jti = id`) fail from the next request on. The audit record names the id
/// (a consent id, not patient data).
pub async fn revoke_consent(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
) -> ApiResult<Response> {
    if crate::revocation::valid_grant_id(&id) {
        slot.update(|d| d.resource_id = Some(id.clone()));
    }
    st.facade
        .auth
        .revocations
        .revoke(Some(&access.principal.tenant), &id)
        .map_err(|e| match e {
            crate::revocation::RevocationError::BadId => ApiError::BadRequest(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        })?;
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&crate::error::operation_outcome(
            "information",
            "informational",
            "grant revoked",
        ))
        .unwrap_or_default(),
    ))
}

/// `GET /admin/audit/verify` (audit or admin role): walks the audit hash chain of the running
/// server (the CLI's `tributary audit verify` needs the server stopped). 200 when intact, 409
/// naming the first bad record otherwise.
pub async fn verify_audit(
    State(st): State<AppState>,
    Extension(_access): Extension<Access>,
) -> ApiResult<Response> {
    let log = st.rt.audit.clone();
    let report = tokio::task::spawn_blocking(move || log.verify())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let (status, body) = match report {
        Ok(r) => (
            StatusCode::OK,
            json!({"intact": true, "entries": r.entries, "head_hash": r.head_hash}),
        ),
        Err(bad) => (
            StatusCode::CONFLICT,
            json!({"intact": false, "first_bad_record": bad.seq, "reason": bad.reason}),
        ),
    };
    Ok(json_response(
        status,
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}

/// `GET /admin/mapping/report` (admin role): the mapping field report of the caller's tenant —
/// which source fields the mappings left unconsumed or out, how often, first and last seen, an
/// example message id (paths and ids, never values), as `tributary mapping report --json` prints.
pub async fn mapping_report(
    State(st): State<AppState>,
    Extension(access): Extension<Access>,
) -> ApiResult<Response> {
    let store = tributary_storage::FieldReportStore::new(st.rt.db.clone());
    let tenant = access.principal.tenant.clone();
    let report = tokio::task::spawn_blocking(move || store.read(Some(&tenant)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&report).unwrap_or_default(),
    ))
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("unknown endpoint".into())
}
