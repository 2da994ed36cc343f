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
    conditional_matches, new_id, parse_etag, read_visible,
};
use crate::scopes::Perm;
use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use std::collections::HashMap;
use tributary_storage::{Precondition, ResourceWrite, StoreTransaction, WriteOp};

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

fn entry_err(i: usize, e: ApiError) -> ApiError {
    let msg = format!("entry {i}: {}", e.public_message());
    match e {
        ApiError::BadRequest(_) => ApiError::BadRequest(msg),
        ApiError::Forbidden(_) => ApiError::Forbidden(msg),
        ApiError::NotFound(_) => ApiError::NotFound(msg),
        ApiError::Conflict(_) => ApiError::Conflict(msg),
        ApiError::PreconditionFailed(_) => ApiError::PreconditionFailed(msg),
        ApiError::Unprocessable(_) => ApiError::Unprocessable(msg),
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
                        access.require(Perm::Read, &rtype, &f.id, &f.resource()?)?;
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
                access.require(Perm::Delete, &rtype, &id, &c.resource()?)?;
            } else if !access.may(Perm::Delete, &rtype) {
                return Err(ApiError::Forbidden(
                    "token scopes do not allow delete".into(),
                ));
            }
            Ok(Planned::Write(ResourceWrite::delete(&rtype, &id)))
        }
        other => Err(ApiError::BadRequest(format!(
            "entry method {other:?} is not supported here (POST, PUT, DELETE; GET in batch)"
        ))),
    }
}

/// Access check for a planned upsert after references were rewritten.
fn check_write(
    st: &AppState,
    access: &Access,
    w: &mut ResourceWrite,
    map: &HashMap<String, String>,
) -> ApiResult<()> {
    if let WriteOp::Upsert(v) = &mut w.op {
        rewrite_refs(v, map);
        v["id"] = Value::String(w.id.clone());
        crate::subscription::stamp_if_subscription(access, &w.resource_type, v);
        if w.precondition == Precondition::MustNotExist {
            access.require(Perm::Create, &w.resource_type, &w.id, v)?;
        } else {
            check_update(st, access, &w.resource_type, &w.id, v, None)?;
        }
    }
    Ok(())
}

fn response_entry(
    status: &str,
    location: Option<String>,
    etag: Option<u64>,
    resource: Option<Value>,
) -> Value {
    let mut r = json!({"status": status});
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
    // The policy stage charged one write; each further entry costs a write too (a batch of a
    // thousand searches is not one request's worth of work).
    let limiter = &st.facade.limiter;
    if limiter.enabled() && entries.len() > 1 {
        let extra = (entries.len() as u64 - 1).saturating_mul(limiter.write_cost());
        let p = &access.principal;
        if let Err(l) = limiter.check(&p.tenant, &p.client_id, p.user.as_deref(), extra) {
            return Err(ApiError::TooManyRequests {
                retry_after_secs: l.retry_after_secs,
            });
        }
    }
    let base = base_url(&st, &headers);
    slot.update(|d| d.returned = Some(entries.len()));
    match kind {
        "transaction" => run_transaction(&st, &access, &base, &entries).await,
        "batch" => run_batch(&st, &access, &base, &entries).await,
        other => Err(ApiError::BadRequest(format!(
            "Bundle.type must be transaction or batch, not {other:?}"
        ))),
    }
}

async fn run_transaction(
    st: &AppState,
    access: &Access,
    base: &str,
    entries: &[Value],
) -> ApiResult<Response> {
    let mut map = HashMap::new();
    let mut planned = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        planned.push(plan_entry(st, access, e, &mut map).map_err(|err| entry_err(i, err))?);
    }
    let mut writes = Vec::new();
    for (i, p) in planned.iter_mut().enumerate() {
        if let Planned::Write(w) = p {
            check_write(st, access, w, &map).map_err(|err| entry_err(i, err))?;
            writes.push(w.clone());
        }
    }
    let tx = StoreTransaction {
        tenant: access.principal.tenant.clone(),
        writes,
        ..Default::default()
    };
    let outcome = st.rt.store.commit(tx).await?;
    let mut results = outcome.writes.into_iter();
    let mut out = Vec::new();
    for p in planned {
        match p {
            Planned::Existing { rtype, id, version } => out.push(response_entry(
                "200 OK",
                Some(format!("{rtype}/{id}/_history/{version}")),
                Some(version),
                None,
            )),
            Planned::Write(w) => {
                let r = results
                    .next()
                    .ok_or_else(|| ApiError::Internal("commit outcome short".into()))?;
                if matches!(w.op, WriteOp::Delete) {
                    out.push(response_entry("204 No Content", None, None, None));
                } else {
                    let status = if r.created { "201 Created" } else { "200 OK" };
                    let res: Value = serde_json::from_slice(&r.json).unwrap_or(Value::Null);
                    let mut e = response_entry(
                        status,
                        Some(format!(
                            "{}/{}/_history/{}",
                            r.resource_type, r.id, r.version
                        )),
                        Some(r.version),
                        Some(res),
                    );
                    e["fullUrl"] = json!(format!("{base}/{}/{}", r.resource_type, r.id));
                    out.push(e);
                }
            }
        }
    }
    Ok(bundle_response(
        &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": out}),
    ))
}

async fn run_batch(
    st: &AppState,
    access: &Access,
    base: &str,
    entries: &[Value],
) -> ApiResult<Response> {
    let mut out = Vec::new();
    let scratch = AuditSlot::default();
    for e in entries {
        let result: ApiResult<Value> = async {
            let method = e
                .get("request")
                .and_then(|r| r.get("method"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if method == "GET" {
                let url = e["request"]["url"].as_str().unwrap_or("");
                let (rtype, id, query) = split_url(url);
                return match id {
                    Some(id) => {
                        let (stored, v) = read_visible(st, access, &rtype, &id, &scratch)?;
                        Ok(response_entry(
                            "200 OK",
                            None,
                            Some(stored.version),
                            Some(v),
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
                        let res =
                            crate::search::run_search(st, access, &rtype, &params, Perm::Search)?;
                        Ok(response_entry(
                            "200 OK",
                            None,
                            None,
                            Some(crate::search::searchset(base, &rtype, &params, &res)?),
                        ))
                    }
                };
            }
            let mut map = HashMap::new();
            let planned = plan_entry(st, access, e, &mut map)?;
            match planned {
                Planned::Existing { rtype, id, version } => Ok(response_entry(
                    "200 OK",
                    Some(format!("{rtype}/{id}/_history/{version}")),
                    Some(version),
                    None,
                )),
                Planned::Write(mut w) => {
                    check_write(st, access, &mut w, &map)?;
                    let is_delete = matches!(w.op, WriteOp::Delete);
                    let r = crate::rest::commit_one(st, access, w).await?;
                    if is_delete {
                        Ok(response_entry("204 No Content", None, None, None))
                    } else {
                        let status = if r.created { "201 Created" } else { "200 OK" };
                        Ok(response_entry(
                            status,
                            Some(format!(
                                "{}/{}/_history/{}",
                                r.resource_type, r.id, r.version
                            )),
                            Some(r.version),
                            serde_json::from_slice(&r.json).ok(),
                        ))
                    }
                }
            }
        }
        .await;
        out.push(match result {
            Ok(v) => v,
            Err(err) => {
                let status = err.status();
                json!({"response": {"status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")), "outcome": operation_outcome("error", "processing", &err.public_message())}})
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
