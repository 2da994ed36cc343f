//! `POST /fhir` with a `transaction` Bundle (all entries in one atomic [`Store::commit`], with
//! `urn:uuid:` references resolved to the ids assigned) or a `batch` Bundle (each entry alone).
//! Every entry is authorized like the equivalent single request.
//!
//! [`Store::commit`]: tributary_storage::Store::commit

use crate::audit::AuditSlot;
use crate::error::{operation_outcome, ApiError, ApiResult};
use crate::policy::{valid_id, Access};
use crate::rest::{
    base_url, bundle_response, check_id, check_resource, check_type, check_update,
    conditional_matches, new_id, note_patient, parse_etag, patched_resource, read_visible,
    PatchBody, Return,
};
use crate::scopes::Perm;
use crate::AppState;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use std::collections::HashMap;
use tributary_storage::{Precondition, ResourceWrite, StoreTransaction, WriteOp, WriteOutcome};

/// Most entries in one Bundle.
pub const MAX_ENTRIES: usize = 1000;

enum Planned {
    Write(ResourceWrite),
    /// A conditional create that matched: answer 200 with the existing resource's location.
    Existing {
        rtype: String,
        id: String,
        version: u64,
    },
}

fn rewrite_refs(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "reference" {
                    if let Value::String(s) = child {
                        if let Some(to) = map.get(s.as_str()) {
                            *s = to.clone();
                        }
                    }
                } else {
                    rewrite_refs(child, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite_refs(c, map)),
        _ => {}
    }
}

fn split_url(url: &str) -> (String, Option<String>, Option<String>) {
    let url = url.trim_start_matches('/');
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    let mut parts = path.splitn(2, '/');
    let t = parts.next().unwrap_or("").to_string();
    let id = parts.next().map(String::from).filter(|s| !s.is_empty());
    (t, id, query)
}

/// A Bundle is answered from the built-in store: an entry of a type the caller's tenant routes
/// to a backend FHIR server would read or write the wrong place (and a transaction cannot span
/// two servers atomically), so it is refused (405) and goes as its own request instead.
fn not_routed(st: &AppState, access: &Access, rtype: &str) -> ApiResult<()> {
    match st.facade.backends.route(&access.principal.tenant, rtype) {
        Some(b) => Err(ApiError::MethodNotAllowed(format!(
            "{rtype} is served by the backend FHIR server {:?}: send it as its own request, not in a Bundle",
            b.cfg.name
        ))),
        None => Ok(()),
    }
}

fn entry_err(i: usize, e: ApiError) -> ApiError {
    let msg = format!("entry {i}: {}", e.public_message());
    match e {
        ApiError::BadRequest(_) => ApiError::BadRequest(msg),
        ApiError::Forbidden(_) => ApiError::Forbidden(msg),
        ApiError::NotFound(_) => ApiError::NotFound(msg),
        ApiError::Conflict(_) => ApiError::Conflict(msg),
        ApiError::PreconditionFailed(_) => ApiError::PreconditionFailed(msg),
        ApiError::Unprocessable(_) => ApiError::Unprocessable(msg),
        ApiError::MethodNotAllowed(_) => ApiError::MethodNotAllowed(msg),
        other => other,
    }
}

/// Plans one write entry of a transaction/batch: checks, ids, access. `map` receives
/// `fullUrl → Type/id` for reference resolution.
fn plan_entry(
    st: &AppState,
    access: &Access,
    entry: &Value,
    map: &mut HashMap<String, String>,
    audit: &AuditSlot,
) -> ApiResult<Planned> {
    let req = entry
        .get("request")
        .ok_or_else(|| ApiError::BadRequest("entry.request is missing".into()))?;
    let method = req.get("method").and_then(Value::as_str).unwrap_or("");
    let url = req
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("entry.request.url is missing".into()))?;
    let (rtype, id, query) = split_url(url);
    check_type(&rtype)?;
    not_routed(st, access, &rtype)?;
    let full_url = entry.get("fullUrl").and_then(Value::as_str);
    let resource = entry.get("resource").cloned();
    match method {
        "POST" => {
            let v = resource
                .ok_or_else(|| ApiError::BadRequest("POST entry needs a resource".into()))?;
            check_resource(&v, &rtype)?;
            if let Some(cond) = req.get("ifNoneExist").and_then(Value::as_str) {
                let found = conditional_matches(st, access, &rtype, cond, Perm::Create)?;
                match found.len() {
                    0 => {}
                    1 => {
                        let f = &found[0];
                        let fv = f.resource()?;
                        note_patient(audit, &rtype, &f.id, &fv);
                        audit.update(|d| d.resource_id = Some(f.id.clone()));
                        access.require(Perm::Read, &rtype, &f.id, &fv)?;
                        if let Some(fu) = full_url {
                            map.insert(fu.to_string(), format!("{rtype}/{}", f.id));
                        }
                        return Ok(Planned::Existing {
                            rtype,
                            id: f.id.clone(),
                            version: f.version,
                        });
                    }
                    _ => {
                        return Err(ApiError::PreconditionFailed(
                            "ifNoneExist matched more than one resource".into(),
                        ))
                    }
                }
            }
            let id = new_id();
            audit.update(|d| d.resource_id = Some(id.clone()));
            if let Some(fu) = full_url {
                map.insert(fu.to_string(), format!("{rtype}/{id}"));
            }
            let mut w = ResourceWrite::upsert(&rtype, &id, v);
            w.precondition = Precondition::MustNotExist;
            Ok(Planned::Write(w))
        }
        "PUT" => {
            let v = resource
                .ok_or_else(|| ApiError::BadRequest("PUT entry needs a resource".into()))?;
            check_resource(&v, &rtype)?;
            let id = match (id, query) {
                (Some(id), _) => {
                    check_id(&id)?;
                    id
                }
                (None, Some(q)) => {
                    let found = conditional_matches(st, access, &rtype, &q, Perm::Update)?;
                    match found.len() {
                        0 => v
                            .get("id")
                            .and_then(Value::as_str)
                            .filter(|s| valid_id(s))
                            .map(String::from)
                            .unwrap_or_else(new_id),
                        1 => found[0].id.clone(),
                        _ => {
                            return Err(ApiError::PreconditionFailed(
                                "conditional update matched more than one resource".into(),
                            ))
                        }
                    }
                }
                (None, None) => {
                    return Err(ApiError::BadRequest(
                        "PUT entry url must be Type/id or Type?search".into(),
                    ))
                }
            };
            audit.update(|d| d.resource_id = Some(id.clone()));
            if let Some(fu) = full_url {
                map.insert(fu.to_string(), format!("{rtype}/{id}"));
            }
            let mut w = ResourceWrite::upsert(&rtype, &id, v);
            if let Some(etag) = req.get("ifMatch").and_then(Value::as_str) {
                w.precondition = Precondition::VersionMatch(
                    parse_etag(etag)
                        .ok_or_else(|| ApiError::BadRequest("ifMatch must be W/\"n\"".into()))?,
                );
            }
            Ok(Planned::Write(w))
        }
        "DELETE" => {
            let id =
                id.ok_or_else(|| ApiError::BadRequest("DELETE entry url must be Type/id".into()))?;
            check_id(&id)?;
            if let Some(c) = st
                .rt
                .store
                .read(&access.principal.tenant, &rtype, &id)?
                .filter(|c| !c.deleted)
            {
                let cv = c.resource()?;
                note_patient(audit, &rtype, &id, &cv);
                access.require(Perm::Delete, &rtype, &id, &cv)?;
            } else if !access.may(Perm::Delete, &rtype) {
                return Err(ApiError::Forbidden(
                    "token scopes do not allow delete".into(),
                ));
            }
            Ok(Planned::Write(ResourceWrite::delete(&rtype, &id)))
        }
        "PATCH" => {
            let id =
                id.ok_or_else(|| ApiError::BadRequest("PATCH entry url must be Type/id".into()))?;
            check_id(&id)?;
            let v = resource.ok_or_else(|| {
                ApiError::BadRequest(
                    "PATCH entry needs a resource: a FHIRPath Patch Parameters, or a Binary holding a JSON Patch".into(),
                )
            })?;
            let json_patch;
            let body = match v.get("resourceType").and_then(Value::as_str) {
                Some("Parameters") => PatchBody::FhirPath(&v),
                Some("Binary")
                    if v.get("contentType").and_then(Value::as_str)
                        == Some("application/json-patch+json") =>
                {
                    use base64::Engine as _;
                    let bytes = v
                        .get("data")
                        .and_then(Value::as_str)
                        .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                        .ok_or_else(|| {
                            ApiError::BadRequest("the Binary's data is not base64".into())
                        })?;
                    json_patch = serde_json::from_slice::<Value>(&bytes).map_err(|_| {
                        ApiError::BadRequest("the Binary's JSON Patch is not JSON".into())
                    })?;
                    PatchBody::Json(&json_patch)
                }
                _ => {
                    return Err(ApiError::BadRequest(
                        "PATCH entry resource must be a FHIRPath Patch Parameters, or a Binary with contentType application/json-patch+json".into(),
                    ))
                }
            };
            let stored = st
                .rt
                .store
                .read(&access.principal.tenant, &rtype, &id)?
                .filter(|c| !c.deleted)
                .ok_or_else(|| ApiError::NotFound(format!("{rtype}/{id} not found")))?;
            let current = stored.resource()?;
            note_patient(audit, &rtype, &id, &current);
            audit.update(|d| d.resource_id = Some(id.clone()));
            access.require(Perm::Update, &rtype, &id, &current)?;
            let version = match req.get("ifMatch").and_then(Value::as_str) {
                Some(etag) => parse_etag(etag)
                    .ok_or_else(|| ApiError::BadRequest("ifMatch must be W/\"n\"".into()))?,
                None => stored.version,
            };
            let patched = patched_resource(&current, &rtype, &id, body)?;
            let mut w = ResourceWrite::upsert(&rtype, &id, patched);
            w.precondition = Precondition::VersionMatch(version);
            Ok(Planned::Write(w))
        }
        other => Err(ApiError::BadRequest(format!(
            "entry method {other:?} is not supported here (POST, PUT, PATCH, DELETE; GET in batch)"
        ))),
    }
}

/// Access check for a planned upsert after references were rewritten.
fn check_write(
    st: &AppState,
    access: &Access,
    w: &mut ResourceWrite,
    map: &HashMap<String, String>,
    audit: &AuditSlot,
) -> ApiResult<()> {
    if let WriteOp::Upsert(v) = &mut w.op {
        rewrite_refs(v, map);
        v["id"] = Value::String(w.id.clone());
        crate::subscription::stamp_if_subscription(access, &w.resource_type, v);
        note_patient(audit, &w.resource_type, &w.id, v);
        if w.precondition == Precondition::MustNotExist {
            access.require(Perm::Create, &w.resource_type, &w.id, v)?;
        } else {
            check_update(st, access, &w.resource_type, &w.id, v, Some(audit))?;
        }
    }
    Ok(())
}

/// The answer to a conditional create that found its resource: nothing written.
fn existing_entry(rtype: &str, id: &str, version: u64) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        response_entry(
            StatusCode::OK,
            Some(format!("{rtype}/{id}/_history/{version}")),
            Some(version),
            None,
        ),
    )
}

/// The answer to a committed create or update: its location and version, and the resource,
/// an OperationOutcome or neither, as `Prefer: return=` asks.
fn written_entry(base: &str, r: &WriteOutcome, ret: Return) -> (StatusCode, Value) {
    let status = if r.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let resource = match ret {
        Return::Representation => serde_json::from_slice(&r.json).ok(),
        Return::Minimal | Return::Outcome => None,
    };
    let mut e = response_entry(
        status,
        Some(format!(
            "{}/{}/_history/{}",
            r.resource_type, r.id, r.version
        )),
        Some(r.version),
        resource,
    );
    if ret == Return::Outcome {
        e["response"]["outcome"] =
            Return::outcome(crate::rest::written(r), &r.resource_type, &r.id, r.version);
    }
    e["fullUrl"] = json!(format!("{base}/{}/{}", r.resource_type, r.id));
    (status, e)
}

fn response_entry(
    status: StatusCode,
    location: Option<String>,
    etag: Option<u64>,
    resource: Option<Value>,
) -> Value {
    let mut r = json!({"status": status_line(status)});
    if let Some(l) = location {
        r["location"] = json!(l);
    }
    if let Some(e) = etag {
        r["etag"] = json!(format!("W/\"{e}\""));
    }
    let mut e = json!({"response": r});
    if let Some(res) = resource {
        e["resource"] = res;
    }
    e
}

fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

/// The audit draft of entry `i` (see [`AuditSlot::entry`]).
fn open_entry(slot: &AuditSlot, i: usize, entry: &Value) -> AuditSlot {
    let req = entry.get("request");
    let field = |k: &str| {
        req.and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    slot.entry(i, field("method"), field("url"))
}

pub async fn transaction(
    State(st): State<AppState>,
    headers: HeaderMap,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let bundle: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("body is not JSON".into()))?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::BadRequest(
            "POST to the base takes a Bundle".into(),
        ));
    }
    slot.update(|d| d.resource_type = Some("Bundle".into()));
    let kind = bundle.get("type").and_then(Value::as_str).unwrap_or("");
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if entries.len() > MAX_ENTRIES {
        return Err(ApiError::Unprocessable(format!(
            "a Bundle may hold at most {MAX_ENTRIES} entries"
        )));
    }
    let reads_only = entries.iter().all(|e| {
        matches!(
            e.get("request")
                .and_then(|r| r.get("method"))
                .and_then(Value::as_str),
            Some("GET" | "HEAD")
        )
    });
    if !reads_only && access.principal.role_kind.as_deref() == Some("view") {
        return Err(ApiError::Forbidden("the view role cannot write".into()));
    }
    // The policy stage charged one write; the Bundle costs what its entries would cost as
    // requests of their own (a batch of a thousand searches is not one request's worth of
    // work, and a batch of reads is not charged as writes).
    let limiter = &st.facade.limiter;
    if limiter.enabled() && !entries.is_empty() {
        let cost: u64 = entries.iter().map(|e| entry_cost(limiter, e)).sum();
        let extra = cost.saturating_sub(limiter.write_cost());
        let p = &access.principal;
        let class = crate::config::RateClass::Write;
        if let Err(l) = limiter.check(&p.tenant, &p.client_id, p.user.as_deref(), class, extra) {
            return Err(ApiError::TooManyRequests {
                retry_after_secs: l.retry_after_secs,
            });
        }
    }
    let base = base_url(&st, &headers);
    let ret = Return::of(&headers);
    slot.update(|d| d.returned = Some(entries.len()));
    match kind {
        "transaction" => run_transaction(&st, &access, &base, &entries, &slot, ret).await,
        "batch" => run_batch(&st, &access, &base, &entries, &slot, ret).await,
        other => Err(ApiError::BadRequest(format!(
            "Bundle.type must be transaction or batch, not {other:?}"
        ))),
    }
}

/// What one entry would cost as a request of its own; an entry whose request cannot be read
/// costs a write.
fn entry_cost(limiter: &crate::ratelimit::RateLimiter, entry: &Value) -> u64 {
    let request = entry.get("request");
    let field = |k: &str| request.and_then(|r| r.get(k)).and_then(Value::as_str);
    let method = field("method").and_then(|m| axum::http::Method::from_bytes(m.as_bytes()).ok());
    match (method, field("url")) {
        (Some(m), Some(url)) => {
            let (path, query) = match url.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (url, None),
            };
            let req = crate::policy::classify(&m, path, query);
            match req.interaction {
                crate::policy::Interaction::Unknown => limiter.write_cost(),
                _ => limiter.cost(&req),
            }
        }
        _ => limiter.write_cost(),
    }
}

/// Entry `i` failed, and with it the transaction: its audit record gets its error, the other
/// entries examined so far are recorded with the same status as `not-committed`.
fn entry_failed(audits: &[AuditSlot], i: usize, err: ApiError) -> ApiError {
    let status = err.status().as_u16();
    for (j, a) in audits.iter().enumerate() {
        a.finish(
            status,
            Some(if j == i { err.kind() } else { "not-committed" }),
        );
    }
    entry_err(i, err)
}

async fn run_transaction(
    st: &AppState,
    access: &Access,
    base: &str,
    entries: &[Value],
    slot: &AuditSlot,
    ret: Return,
) -> ApiResult<Response> {
    let mut map = HashMap::new();
    let mut planned = Vec::with_capacity(entries.len());
    let mut audits = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        audits.push(open_entry(slot, i, e));
        match plan_entry(st, access, e, &mut map, &audits[i]) {
            Ok(p) => planned.push(p),
            Err(err) => return Err(entry_failed(&audits, i, err)),
        }
    }
    let mut writes = Vec::new();
    for (i, p) in planned.iter_mut().enumerate() {
        if let Planned::Write(w) = p {
            if let Err(err) = check_write(st, access, w, &map, &audits[i]) {
                return Err(entry_failed(&audits, i, err));
            }
            writes.push(w.clone());
        }
    }
    let tx = StoreTransaction {
        tenant: access.principal.tenant.clone(),
        writes,
        ..Default::default()
    };
    // A failed commit leaves the entries' status unset: they get the request's.
    let outcome = st.rt.store.commit(tx).await?;
    let mut results = outcome.writes.into_iter();
    let mut out = Vec::new();
    for (p, audit) in planned.into_iter().zip(&audits) {
        let (status, entry) = match p {
            Planned::Existing { rtype, id, version } => existing_entry(&rtype, &id, version),
            Planned::Write(w) => {
                let r = results
                    .next()
                    .ok_or_else(|| ApiError::Internal("commit outcome short".into()))?;
                if matches!(w.op, WriteOp::Delete) {
                    (
                        StatusCode::NO_CONTENT,
                        response_entry(StatusCode::NO_CONTENT, None, None, None),
                    )
                } else {
                    written_entry(base, &r, ret)
                }
            }
        };
        audit.finish(status.as_u16(), None);
        out.push(entry);
    }
    Ok(bundle_response(
        &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": out}),
    ))
}

/// One batch entry: its response status and `Bundle.entry`.
async fn batch_entry(
    st: &AppState,
    access: &Access,
    base: &str,
    e: &Value,
    audit: &AuditSlot,
    ret: Return,
) -> ApiResult<(StatusCode, Value)> {
    let method = e
        .get("request")
        .and_then(|r| r.get("method"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if method == "GET" {
        let url = e["request"]["url"].as_str().unwrap_or("");
        let (rtype, id, query) = split_url(url);
        not_routed(st, access, &rtype)?;
        return match id {
            Some(id) => {
                let (stored, v) = read_visible(st, access, &rtype, &id, audit)?;
                Ok((
                    StatusCode::OK,
                    response_entry(StatusCode::OK, None, Some(stored.version), Some(v)),
                ))
            }
            None => {
                check_type(&rtype)?;
                if !access.may(Perm::Search, &rtype) {
                    return Err(ApiError::Forbidden(format!(
                        "token scopes do not allow search on {rtype}"
                    )));
                }
                let params = crate::policy::decode_query(query.as_deref());
                let mut res = crate::search::run_search(st, access, &rtype, &params, Perm::Search)?;
                crate::search::include_from_backends(st, access, audit, &params, &mut res).await;
                audit.update(|d| d.returned = Some(res.returned()));
                Ok((
                    StatusCode::OK,
                    response_entry(
                        StatusCode::OK,
                        None,
                        None,
                        Some(crate::search::searchset(
                            base, &rtype, &params, &res, audit,
                        )?),
                    ),
                ))
            }
        };
    }
    let mut map = HashMap::new();
    match plan_entry(st, access, e, &mut map, audit)? {
        Planned::Existing { rtype, id, version } => Ok(existing_entry(&rtype, &id, version)),
        Planned::Write(mut w) => {
            check_write(st, access, &mut w, &map, audit)?;
            let is_delete = matches!(w.op, WriteOp::Delete);
            let r = crate::rest::commit_one(st, access, w).await?;
            if is_delete {
                return Ok((
                    StatusCode::NO_CONTENT,
                    response_entry(StatusCode::NO_CONTENT, None, None, None),
                ));
            }
            Ok(written_entry(base, &r, ret))
        }
    }
}

async fn run_batch(
    st: &AppState,
    access: &Access,
    base: &str,
    entries: &[Value],
    slot: &AuditSlot,
    ret: Return,
) -> ApiResult<Response> {
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let audit = open_entry(slot, i, e);
        out.push(match batch_entry(st, access, base, e, &audit, ret).await {
            Ok((status, v)) => {
                audit.finish(status.as_u16(), None);
                v
            }
            Err(err) => {
                let status = err.status();
                audit.finish(status.as_u16(), Some(err.kind()));
                json!({"response": {"status": status_line(status), "outcome": operation_outcome("error", "processing", &err.public_message())}})
            }
        });
    }
    Ok(bundle_response(
        &json!({"resourceType": "Bundle", "type": "batch-response", "entry": out}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_rewritten_everywhere() {
        let mut map = HashMap::new();
        map.insert("urn:uuid:1".to_string(), "Patient/abc".to_string());
        let mut v = json!({"subject": {"reference": "urn:uuid:1"}, "performer": [{"reference": "urn:uuid:1"}], "note": [{"text": "urn:uuid:1"}]});
        rewrite_refs(&mut v, &map);
        assert_eq!(v["subject"]["reference"], "Patient/abc");
        assert_eq!(v["performer"][0]["reference"], "Patient/abc");
        assert_eq!(v["note"][0]["text"], "urn:uuid:1");
        assert_eq!(
            split_url("Patient?identifier=a|b"),
            ("Patient".into(), None, Some("identifier=a|b".into()))
        );
        assert_eq!(
            split_url("/Patient/1"),
            ("Patient".into(), Some("1".into()), None)
        );
    }
}
