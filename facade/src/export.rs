//! Bulk Data export (FHIR Bulk Data Access IG 2.0, the asynchronous request pattern).
//!
//! `GET /fhir/$export` (every type) and `GET /fhir/Patient/$export` (the patient compartments)
//! start a job and answer 202 with a status URL. The job writes what the token may read from the
//! built-in store as NDJSON files under `<data_dir>/exports/<job>/`, one type per file (split at
//! `export.file_max_resources`). Polling the status URL answers 202 with progress, then the
//! manifest; a `DELETE` cancels the job or deletes its files. Status and files belong to the
//! grant that started the job (same tenant, client, user, patient context and scopes): anyone
//! else gets 404.
//!
//! A job's state lives in `job.json` beside its files, so a finished export survives a restart;
//! a job interrupted by one reports the failure instead of hanging at 202. Downloads are audited
//! like searches: each patient whose resources a file holds gets a disclosure record, so an
//! export is in every exported patient's audit report.

use crate::audit::{AuditSlot, Disclosed};
use crate::capability::RESOURCE_TYPES;
use crate::config::ExportConfig;
use crate::error::{operation_outcome, ApiError, ApiResult, FHIR_JSON};
use crate::policy::{patient_links, valid_type, Access, FhirRequest};
use crate::scopes::Perm;
use crate::subset::Subset;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tributary_storage::{Store, StoredResource};

const JOB_FILE: &str = "job.json";
const NDJSON: &str = "application/fhir+ndjson";
const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];
const PARAMS: [&str; 5] = [
    "_elements",
    "_outputFormat",
    "_since",
    "_type",
    "_typeFilter",
];
/// Exported only when `_type` names them: a Subscription carries its endpoint's credentials in
/// `channel.header`, and the others are not stored resources.
const NOT_BY_DEFAULT: [&str; 4] = ["Subscription", "Bundle", "OperationOutcome", "Parameters"];
/// Resources read from the store at a time.
const PAGE: usize = 1000;
/// Seconds a client is asked to wait between polls, and before retrying a refused kick-off.
const POLL_SECS: u64 = 2;
const BUSY_SECS: u64 = 30;

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum JobState {
    Running,
    Complete,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Output {
    #[serde(rename = "type")]
    rtype: String,
    file: String,
    count: usize,
}

/// What `job.json` holds: the owner, the request, and (once finished) the files.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Job {
    tenant: String,
    client: String,
    /// The starting token's user, patient context and scopes: the status and the files answer
    /// that same grant only (two users of one app share a client id, not their data).
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    patient: Option<String>,
    #[serde(default)]
    scopes: String,
    /// The kick-off URL, repeated in the manifest's `request`.
    request: String,
    transaction_time: i64,
    state: JobState,
    /// Why a failed job failed: a kind of error, never data.
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    output: Vec<Output>,
    /// NDJSON files of OperationOutcomes: the types that could not be exported, and why.
    #[serde(default)]
    errors: Vec<Output>,
    #[serde(default)]
    finished: Option<i64>,
}

struct Running {
    cancel: CancellationToken,
    progress: Arc<Mutex<String>>,
}

/// The export jobs of this instance: their directory, and the ones running now.
pub struct Exports {
    dir: PathBuf,
    cfg: ExportConfig,
    running: Mutex<HashMap<String, Running>>,
}

impl Exports {
    /// Opens `<data_dir>/exports`; jobs a previous process left running are marked failed.
    pub fn open(data_dir: &FsPath, cfg: ExportConfig) -> Exports {
        let ex = Exports {
            dir: data_dir.join("exports"),
            cfg,
            running: Mutex::default(),
        };
        for (id, mut job) in ex.jobs() {
            if job.state == JobState::Running {
                job.state = JobState::Failed;
                job.error =
                    Some("interrupted by a restart of the server; start the export again".into());
                job.finished = Some(tributary_core::now_millis());
                if let Err(e) = ex.save(&id, &job) {
                    tracing::warn!(job = %id, error = %e, "could not mark an interrupted export failed");
                }
            }
        }
        ex
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn load(&self, id: &str) -> Option<Job> {
        let bytes = std::fs::read(self.job_dir(id).join(JOB_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, id: &str, job: &Job) -> std::io::Result<()> {
        let dir = self.job_dir(id);
        let tmp = dir.join("job.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(job)?)?;
        std::fs::rename(tmp, dir.join(JOB_FILE))
    }

    /// Every job on disk, by id.
    fn jobs(&self) -> Vec<(String, Job)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                valid_job_id(&id).then(|| self.load(&id).map(|j| (id, j)))?
            })
            .collect()
    }

    /// Deletes the files of finished jobs older than `retention_secs`. Runs at each kick-off
    /// and poll, and every few minutes from [`Exports::keep_swept`].
    pub fn sweep(&self) {
        let now = tributary_core::now_millis();
        let keep_ms =
            i64::try_from(self.cfg.retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        for (id, job) in self.jobs() {
            if job
                .finished
                .is_some_and(|f| f.saturating_add(keep_ms) < now)
            {
                if let Err(e) = std::fs::remove_dir_all(self.job_dir(&id)) {
                    tracing::warn!(job = %id, error = %e, "could not delete an expired export");
                }
            }
        }
    }

    /// Sweeps every five minutes until `shutdown`, so expired files go even when no client
    /// asks for exports any more.
    pub async fn keep_swept(&self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(300)) => {}
            }
            // A directory listing and a few small files: short enough for a worker.
            self.sweep();
        }
    }

    fn expires(&self, job: &Job) -> Option<i64> {
        let keep_ms = i64::try_from(self.cfg.retention_secs.saturating_mul(1000)).ok()?;
        job.finished.map(|f| f.saturating_add(keep_ms))
    }

    /// The job `id` if it is the caller's (same tenant, client, user, patient context and
    /// scopes as the token that started it): anyone else's is answered as if it did not exist.
    fn owned(&self, id: &str, access: &Access) -> ApiResult<Job> {
        let p = &access.principal;
        valid_job_id(id)
            .then(|| self.load(id))
            .flatten()
            .filter(|j| {
                j.tenant == p.tenant
                    && j.client == p.client_id
                    && j.user == p.user
                    && j.patient == p.patient
                    && j.scopes == p.scope_text
            })
            .ok_or_else(|| ApiError::NotFound(format!("no export job {id}")))
    }
}

/// Job ids are UUIDs written by us; anything else never reaches the file system.
fn valid_job_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// `{Type}-{n}.ndjson`, with a known type.
fn valid_file_name(name: &str) -> bool {
    name.strip_suffix(".ndjson")
        .and_then(|s| s.rsplit_once('-'))
        .is_some_and(|(t, n)| {
            RESOURCE_TYPES.binary_search(&t).is_ok()
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        })
}

/// What a kick-off asked for.
struct Request {
    types: Vec<String>,
    since: Option<i64>,
    /// `Patient/$export`, `Group/{id}/$export`: only resources in some patient's compartment.
    patients_only: bool,
    /// `Group/{id}/$export`: the Group's active Patient members, as of the kick-off.
    group: Option<Vec<String>>,
    /// `_typeFilter`: per type, the searches of which a resource must match one (all of one's
    /// parameters); types without any are exported whole.
    filters: BTreeMap<String, Vec<Vec<(String, String)>>>,
    /// `_elements`: the elements to keep (`Patient.name`: of that type; `id`: of every type
    /// that has it); `None`: whole resources.
    elements: Option<Vec<(Option<String>, String)>>,
}

/// Adds the elements one `_elements` value names (`Type.element` or `element`, top level only).
fn parse_elements(v: &str, out: &mut Vec<(Option<String>, String)>) -> ApiResult<()> {
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let (t, e) = match name.split_once('.') {
            Some((t, e)) if valid_type(t) && !e.is_empty() && !e.contains('.') => {
                (Some(t.to_string()), e)
            }
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "_elements {name:?}: <resource type>.<top-level element> or <element>"
                )))
            }
            None => (None, name),
        };
        out.push((t, e.to_string()));
    }
    Ok(())
}

/// Whether `rtype` has the element `name` (a choice such as `value` counts).
fn has_element(rtype: &str, name: &str) -> bool {
    tributary_core::fhir_r4::element(rtype, name).is_some()
        || tributary_core::fhir_r4::has_choice(rtype, name)
}

impl Request {
    /// The subset `_elements` asks of `rtype`'s resources: the elements named for it or for
    /// every type that it has.
    fn subset(&self, rtype: &str) -> Option<Subset> {
        let names = self
            .elements
            .as_ref()?
            .iter()
            .filter(|(t, e)| t.as_deref().map_or(has_element(rtype, e), |t| t == rtype))
            .map(|(_, e)| e.clone())
            .collect();
        Some(Subset::Elements(names))
    }

    /// Whether `r` matches one of its type's `_typeFilter` searches (if it has any).
    fn admits(&self, r: &StoredResource, v: &Value) -> Result<bool, String> {
        let Some(searches) = self.filters.get(&r.resource_type) else {
            return Ok(true);
        };
        for search in searches {
            let mut all = true;
            for (k, value) in search {
                if !crate::search::param_matches(r, v, k, value).map_err(|e| e.public_message())? {
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Adds the searches of one `_typeFilter` value (`Type?query`, several separated by commas, each
/// query URL-encoded as in a search URL) to `filters`, refusing what a search would refuse.
fn parse_type_filter(
    v: &str,
    filters: &mut BTreeMap<String, Vec<Vec<(String, String)>>>,
) -> ApiResult<()> {
    for one in v.split(',').filter(|q| !q.is_empty()) {
        let Some((t, query)) = one.split_once('?').filter(|(t, _)| valid_type(t)) else {
            return Err(ApiError::BadRequest(format!(
                "_typeFilter {one:?}: must be <resource type>?<search parameters>"
            )));
        };
        let params = crate::policy::decode_query(Some(query));
        if params.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "_typeFilter {one:?}: no search parameters"
            )));
        }
        for (k, v) in &params {
            crate::search::check_filter(t, k, v).map_err(|e| {
                ApiError::BadRequest(format!("_typeFilter {t}: {}", e.public_message()))
            })?;
        }
        filters.entry(t.to_string()).or_default().push(params);
    }
    Ok(())
}

fn parse(req: &FhirRequest, access: &Access) -> ApiResult<Request> {
    let mut asked: Option<Vec<String>> = None;
    let mut since = None;
    let mut filters = BTreeMap::new();
    let mut elements = None;
    for (k, v) in &req.params {
        match k.as_str() {
            "_type" => crate::everything::parse_types(v, asked.get_or_insert_with(Vec::new))?,
            "_since" => since = Some(crate::everything::parse_since(v)?),
            "_typeFilter" => parse_type_filter(v, &mut filters)?,
            "_elements" => parse_elements(v, elements.get_or_insert_with(Vec::new))?,
            "_outputFormat" if OUTPUT_FORMATS.contains(&v.as_str()) => {}
            "_outputFormat" => {
                return Err(ApiError::BadRequest(format!(
                    "_outputFormat: only NDJSON ({})",
                    OUTPUT_FORMATS.join(", ")
                )))
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "$export does not take {other:?} (it takes {})",
                    PARAMS.join(", ")
                )))
            }
        }
    }
    let types = match asked {
        Some(mut types) => {
            types.sort_unstable();
            types.dedup();
            if let Some(t) = types.iter().find(|t| !access.may(Perm::Read, t)) {
                return Err(ApiError::Forbidden(format!(
                    "token scopes do not allow read on {t}"
                )));
            }
            types
        }
        None => RESOURCE_TYPES
            .iter()
            .filter(|t| !NOT_BY_DEFAULT.contains(t) && access.may(Perm::Read, t))
            .map(|t| t.to_string())
            .collect(),
    };
    if types.is_empty() {
        return Err(ApiError::Forbidden(
            "token scopes allow reading no resource type".into(),
        ));
    }
    if let Some(t) = filters.keys().find(|t| !types.contains(t)) {
        return Err(ApiError::BadRequest(format!(
            "_typeFilter names {t}, which this export does not include (_type, or the types the token may read)"
        )));
    }
    for (t, e) in elements.iter().flatten() {
        let known = match t {
            Some(t) if !types.contains(t) => {
                return Err(ApiError::BadRequest(format!(
                    "_elements names {t}.{e}, but this export does not include {t}"
                )))
            }
            Some(t) => has_element(t, e),
            None => types.iter().any(|t| has_element(t, e)),
        };
        if !known {
            return Err(ApiError::BadRequest(format!(
                "_elements: no exported type has the element {e:?}"
            )));
        }
    }
    Ok(Request {
        types,
        since,
        patients_only: matches!(req.resource_type.as_deref(), Some("Patient" | "Group")),
        group: None,
        filters,
        elements,
    })
}

/// The Patient members of Group `id` (`member.entity`, leaving out `inactive` ones), when the
/// caller may read the Group; 404 as for a read otherwise.
fn group_members(st: &AppState, access: &Access, id: &str) -> ApiResult<Vec<String>> {
    crate::rest::check_id(id)?;
    let missing = || ApiError::NotFound(format!("Group/{id} not found"));
    let r = st
        .rt
        .store
        .read(&access.principal.tenant, "Group", id)?
        .filter(|r| !r.deleted)
        .ok_or_else(missing)?;
    let group = r.resource()?;
    access.require(Perm::Read, "Group", id, &group)?;
    let mut members: Vec<String> = group["member"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["inactive"] != true)
        .filter_map(|m| m["entity"]["reference"].as_str()?.strip_prefix("Patient/"))
        .filter(|p| crate::policy::valid_id(p))
        .map(String::from)
        .collect();
    members.sort_unstable();
    members.dedup();
    Ok(members)
}

fn asks_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

fn busy(reason: &str) -> Response {
    let mut res = (
        StatusCode::TOO_MANY_REQUESTS,
        operation_outcome("error", "throttled", reason).to_string(),
    )
        .into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    h.insert(header::RETRY_AFTER, HeaderValue::from(BUSY_SECS));
    res
}

fn status_url(base: &str, id: &str) -> String {
    format!("{base}/$export-status/{id}")
}

/// `GET /fhir/$export`, `GET /fhir/Patient/$export`, `GET /fhir/Group/{id}/$export`: starts a
/// job (202, `Content-Location`).
pub async fn kick_off(
    State(st): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Extension(access): Extension<Access>,
    Extension(req): Extension<FhirRequest>,
) -> ApiResult<Response> {
    if !asks_async(&headers) {
        return Err(ApiError::BadRequest(
            "bulk export is asynchronous: send `Prefer: respond-async`".into(),
        ));
    }
    let mut asked = parse(&req, &access)?;
    if let (Some("Group"), Some(id)) = (req.resource_type.as_deref(), req.id.as_deref()) {
        asked.group = Some(group_members(&st, &access, id)?);
    }
    let exports = &st.facade.exports;
    exports.sweep();
    let p = &access.principal;
    let id = uuid::Uuid::now_v7().hyphenated().to_string();
    let base = crate::rest::base_url(&st, &headers);
    let path = uri.path_and_query().map_or("", |pq| pq.as_str());
    let job = Job {
        tenant: p.tenant.clone(),
        client: p.client_id.clone(),
        user: p.user.clone(),
        patient: p.patient.clone(),
        scopes: p.scope_text.clone(),
        request: format!("{base}{}", path.strip_prefix("/fhir").unwrap_or(path)),
        transaction_time: tributary_core::now_millis(),
        state: JobState::Running,
        error: None,
        output: Vec::new(),
        errors: Vec::new(),
        finished: None,
    };
    let running = Running {
        cancel: st.rt.shutdown.child_token(),
        progress: Arc::default(),
    };
    let (cancel, progress) = (running.cancel.clone(), running.progress.clone());
    {
        let mut now = exports.running.lock().unwrap_or_else(|e| e.into_inner());
        if now.len() >= exports.cfg.max_running {
            return Ok(busy(
                "the server is running as many exports as it may; try again later",
            ));
        }
        let kept = exports
            .jobs()
            .iter()
            .filter(|(_, j)| j.tenant == p.tenant)
            .count();
        if kept >= exports.cfg.max_jobs_per_tenant {
            return Ok(busy(
                "this tenant keeps as many exports as it may; delete finished ones (DELETE their status URL) or wait for them to expire",
            ));
        }
        std::fs::create_dir_all(exports.job_dir(&id))
            .and_then(|()| exports.save(&id, &job))
            .map_err(|e| ApiError::Internal(format!("export job directory: {e}")))?;
        now.insert(id.clone(), running);
    }
    let routed: Vec<(String, String)> = st
        .facade
        .backends
        .routed_types(&p.tenant)
        .into_iter()
        .map(|(t, b)| (t.to_string(), b.to_string()))
        .collect();
    let (st2, id2) = (st.clone(), id.clone());
    tokio::task::spawn_blocking(move || {
        let exports = &st2.facade.exports;
        let dir = exports.job_dir(&id2);
        let w = Writer {
            store: st2.rt.store.as_ref(),
            access: &access,
            dir: &dir,
            file_max: exports.cfg.file_max_resources,
            cancel: &cancel,
            progress: &progress,
        };
        let mut job = job;
        match w.run(&asked, &routed) {
            Ok((output, errors)) => {
                job.state = JobState::Complete;
                job.output = output;
                job.errors = errors;
            }
            Err(_) if st2.rt.shutdown.is_cancelled() => {
                job.state = JobState::Failed;
                job.error =
                    Some("interrupted by a shutdown of the server; start the export again".into());
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(e);
            }
        }
        job.finished = Some(tributary_core::now_millis());
        // Under the lock a DELETE takes: either it found the job running and cancelled it
        // (then the job removes its files here), or it finds it finished and removes them.
        let mut running = exports.running.lock().unwrap_or_else(|e| e.into_inner());
        running.remove(&id2);
        let cancelled = cancel.is_cancelled() && !st2.rt.shutdown.is_cancelled();
        if cancelled {
            let _ = std::fs::remove_dir_all(&dir);
        } else if let Err(e) = exports.save(&id2, &job) {
            tracing::error!(job = %id2, error = %e, "could not record a finished export");
        }
        drop(running);
        tracing::info!(job = %id2, state = ?job.state, files = job.output.len(), cancelled, "export finished");
    });
    let mut res = (
        StatusCode::ACCEPTED,
        operation_outcome(
            "information",
            "informational",
            "export started; poll the Content-Location URL",
        )
        .to_string(),
    )
        .into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    if let Ok(v) = HeaderValue::from_str(&status_url(&base, &id)) {
        h.insert(header::CONTENT_LOCATION, v);
    }
    Ok(res)
}

/// Writes one job's files.
struct Writer<'a> {
    store: &'a dyn Store,
    access: &'a Access,
    dir: &'a FsPath,
    file_max: usize,
    cancel: &'a CancellationToken,
    progress: &'a Mutex<String>,
}

/// One NDJSON file being written, and the patients its resources belong to.
struct File {
    name: String,
    out: std::io::BufWriter<std::fs::File>,
    count: usize,
    patients: Disclosed,
}

/// The files of one type: the one being written, and those already closed.
struct TypeFiles<'t> {
    rtype: &'t str,
    open: Option<File>,
    opened: usize,
    done: Vec<Output>,
}

impl TypeFiles<'_> {
    /// Writes `r` (its JSON `v`), cut down to `subset` if there is one.
    fn add(
        &mut self,
        w: &Writer,
        r: &StoredResource,
        v: &Value,
        subset: Option<&Subset>,
    ) -> Result<(), String> {
        if self.open.as_ref().is_some_and(|f| f.count >= w.file_max) {
            let full = self.open.take().expect("checked");
            self.done.push(w.close(full, self.rtype)?);
        }
        let f = match self.open.as_mut() {
            Some(f) => f,
            None => {
                self.opened += 1;
                let name = format!("{}-{}.ndjson", self.rtype, self.opened);
                self.open.insert(w.create(&name)?)
            }
        };
        // Stored JSON is compact: one resource per line as it is.
        let line: std::borrow::Cow<[u8]> = if let Some(s) = subset {
            let mut part = v.clone();
            s.apply(self.rtype, &mut part);
            serde_json::to_vec(&part).map_err(|e| e.to_string())?.into()
        } else if r.json.contains(&b'\n') {
            serde_json::to_vec(v).map_err(|e| e.to_string())?.into()
        } else {
            r.json.as_ref().into()
        };
        f.out
            .write_all(&line)
            .and_then(|()| f.out.write_all(b"\n"))
            .map_err(|e| format!("writing an export file: {e}"))?;
        f.count += 1;
        f.patients.add(self.rtype, &r.id, v);
        Ok(())
    }

    fn finish(mut self, w: &Writer) -> Result<Vec<Output>, String> {
        if let Some(f) = self.open.take() {
            self.done.push(w.close(f, self.rtype)?);
        }
        Ok(self.done)
    }
}

impl Writer<'_> {
    /// `(output, errors)`, or why the job failed.
    fn run(
        &self,
        asked: &Request,
        routed: &[(String, String)],
    ) -> Result<(Vec<Output>, Vec<Output>), String> {
        let tenant = &self.access.principal.tenant;
        let mut output = Vec::new();
        let mut problems = Vec::new();
        let members = match &asked.group {
            Some(patients) => Some(self.compartments(patients)?),
            None => None,
        };
        for (i, t) in asked.types.iter().enumerate() {
            if let Some((_, backend)) = routed.iter().find(|(routed, _)| routed == t) {
                problems.push(operation_outcome(
                    "error",
                    "not-supported",
                    &format!("{t} is served by backend {backend}, not the built-in store; export it from there"),
                ));
                continue;
            }
            self.set_progress(format!("{t} ({} of {} types)", i + 1, asked.types.len()));
            let mut files = TypeFiles {
                rtype: t,
                open: None,
                opened: 0,
                done: Vec::new(),
            };
            let by_id = match &members {
                Some(m) => Some(m.get(t.as_str()).cloned().unwrap_or_default()),
                None => self.own_compartment(t)?,
            };
            match by_id {
                // A Group's members' compartments, or the token's own patient's: by id.
                Some(ids) => {
                    for chunk in ids.chunks(PAGE) {
                        self.check_cancelled()?;
                        let mut page = Vec::with_capacity(chunk.len());
                        for id in chunk {
                            match self.store.read(tenant, t, id) {
                                Ok(Some(r)) if !r.deleted => page.push(r),
                                Ok(_) => {}
                                Err(e) => return Err(format!("store: {e}")),
                            }
                        }
                        self.emit(&page, asked, &mut files)?;
                    }
                }
                None => {
                    let mut after: Option<String> = None;
                    loop {
                        self.check_cancelled()?;
                        let page = self
                            .store
                            .list(tenant, t, after.as_deref(), PAGE)
                            .map_err(|e| format!("store: {e}"))?;
                        let Some(last) = page.last() else { break };
                        after = Some(last.id.clone());
                        self.emit(&page, asked, &mut files)?;
                        if page.len() < PAGE {
                            break;
                        }
                    }
                }
            }
            output.extend(files.finish(self)?);
        }
        let mut errors = Vec::new();
        if !problems.is_empty() {
            let mut f = self.create("OperationOutcome-1.ndjson")?;
            for p in &problems {
                serde_json::to_writer(&mut f.out, p)
                    .map_err(|e| e.to_string())
                    .and_then(|()| f.out.write_all(b"\n").map_err(|e| e.to_string()))?;
                f.count += 1;
            }
            errors.push(self.close(f, "OperationOutcome")?);
        }
        Ok((output, errors))
    }

    /// For a type the token reads in its patient's compartment only, that compartment's ids
    /// from the store's patient index (the links `permits()` checks), instead of a scan of the
    /// type: a patient's export need not read the whole tenant. Types without patient links
    /// (shared ones, Subscriptions) are scanned.
    fn own_compartment(&self, t: &str) -> Result<Option<Vec<String>>, String> {
        let Some(pid) = self.access.indexed_compartment(Perm::Read, t) else {
            return Ok(None);
        };
        if t == "Patient" {
            return Ok(Some(vec![pid.to_string()]));
        }
        let ids = self
            .store
            .ids_by_patient(&self.access.principal.tenant, pid, Some(t))
            .map_err(|e| format!("store: {e}"))?;
        Ok(Some(ids.into_iter().map(|(_, id)| id).collect()))
    }

    /// The ids of the resources in these patients' compartments, the Patients included, by
    /// type, each once.
    fn compartments(&self, patients: &[String]) -> Result<BTreeMap<String, Vec<String>>, String> {
        let tenant = &self.access.principal.tenant;
        let mut by_type: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in patients {
            self.check_cancelled()?;
            by_type
                .entry("Patient".into())
                .or_default()
                .insert(p.clone());
            for (t, id) in self
                .store
                .ids_by_patient(tenant, p, None)
                .map_err(|e| format!("store: {e}"))?
            {
                by_type.entry(t).or_default().insert(id);
            }
        }
        Ok(by_type
            .into_iter()
            .map(|(t, ids)| (t, ids.into_iter().collect()))
            .collect())
    }

    fn check_cancelled(&self) -> Result<(), String> {
        if self.cancel.is_cancelled() {
            Err("cancelled".into())
        } else {
            Ok(())
        }
    }

    /// Writes the resources of `page` the request and the token admit.
    fn emit(
        &self,
        page: &[StoredResource],
        asked: &Request,
        files: &mut TypeFiles,
    ) -> Result<(), String> {
        let t = files.rtype;
        let subset = asked.subset(t);
        for r in page {
            if asked.since.is_some_and(|s| r.last_updated < s) {
                continue;
            }
            let v = r.resource().map_err(|e| format!("store: {e}"))?;
            if !self.access.permits(Perm::Read, t, &r.id, &v)
                || (asked.patients_only && patient_links(t, &r.id, &v).is_empty())
                || !asked.admits(r, &v)?
            {
                continue;
            }
            files.add(self, r, &v, subset.as_ref())?;
        }
        Ok(())
    }

    fn set_progress(&self, p: String) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    fn create(&self, name: &str) -> Result<File, String> {
        let f = std::fs::File::create(self.dir.join(name))
            .map_err(|e| format!("creating an export file: {e}"))?;
        Ok(File {
            name: name.to_string(),
            out: std::io::BufWriter::new(f),
            count: 0,
            patients: Disclosed::default(),
        })
    }

    /// Flushes the file and writes the patients it discloses beside it (for the audit records
    /// of its downloads).
    fn close(&self, f: File, rtype: &str) -> Result<Output, String> {
        let File {
            name,
            mut out,
            count,
            patients,
        } = f;
        out.flush()
            .map_err(|e| format!("writing an export file: {e}"))?;
        std::fs::write(
            self.dir.join(format!("{name}.patients.json")),
            serde_json::to_vec(&patients).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("writing an export file: {e}"))?;
        Ok(Output {
            rtype: rtype.to_string(),
            file: name,
            count,
        })
    }
}

/// `GET /fhir/$export-status/{job}`: 202 with `X-Progress` while it runs, the manifest when
/// complete, an OperationOutcome (500) when it failed. `DELETE`: cancels it, or deletes its files.
pub async fn status(
    State(st): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    Extension(access): Extension<Access>,
) -> ApiResult<Response> {
    let exports = &st.facade.exports;
    exports.sweep();
    let job = exports.owned(&id, &access)?;
    if method == Method::DELETE {
        let running = exports.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get(&id) {
            // The job deletes its files as it stops.
            Some(r) => r.cancel.cancel(),
            None => std::fs::remove_dir_all(exports.job_dir(&id))
                .map_err(|e| ApiError::Internal(format!("deleting an export: {e}")))?,
        }
        drop(running);
        let body = operation_outcome("information", "informational", "export deleted");
        return Ok(with_type(
            (StatusCode::ACCEPTED, body.to_string()).into_response(),
            FHIR_JSON,
        ));
    }
    match job.state {
        JobState::Running => {
            let progress = exports
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .map(|r| r.progress.lock().unwrap_or_else(|e| e.into_inner()).clone())
                .unwrap_or_default();
            let mut res = StatusCode::ACCEPTED.into_response();
            let h = res.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("exporting {progress}")) {
                h.insert("x-progress", v);
            }
            h.insert(header::RETRY_AFTER, HeaderValue::from(POLL_SECS));
            Ok(res)
        }
        JobState::Failed => {
            // A job's failure is the client's business, unlike other internal errors: say why
            // (a kind of error, never data).
            let text = format!(
                "export {id} failed: {}",
                job.error.as_deref().unwrap_or("unknown")
            );
            let body = operation_outcome("error", "exception", &text);
            Ok(with_type(
                (StatusCode::INTERNAL_SERVER_ERROR, body.to_string()).into_response(),
                FHIR_JSON,
            ))
        }
        JobState::Complete => {
            let base = crate::rest::base_url(&st, &headers);
            let files = |list: &[Output]| -> Vec<Value> {
                list.iter()
                    .map(|o| json!({"type": o.rtype, "url": format!("{base}/$export-file/{id}/{}", o.file), "count": o.count}))
                    .collect()
            };
            let manifest = json!({
                "transactionTime": tributary_core::format_rfc3339_millis(job.transaction_time),
                "request": job.request,
                "requiresAccessToken": true,
                "output": files(&job.output),
                "error": files(&job.errors),
            });
            let mut res = with_type(
                (StatusCode::OK, manifest.to_string()).into_response(),
                "application/json",
            );
            let expires = exports
                .expires(&job)
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
            if let Some(v) =
                expires.and_then(|t| HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok())
            {
                res.headers_mut().insert(header::EXPIRES, v);
            }
            Ok(res)
        }
    }
}

fn with_type(mut res: Response, content_type: &'static str) -> Response {
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// `GET /fhir/$export-file/{job}/{file}`: one NDJSON file of a complete job, streamed.
pub async fn file(
    State(st): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
) -> ApiResult<Response> {
    let exports = &st.facade.exports;
    let job = exports.owned(&id, &access)?;
    let listed = job
        .output
        .iter()
        .chain(&job.errors)
        .find(|o| o.file == name && valid_file_name(&name))
        .filter(|_| job.state == JobState::Complete)
        .ok_or_else(|| ApiError::NotFound(format!("export {id} has no file {name:?}")))?;
    let dir = exports.job_dir(&id);
    let f = tokio::fs::File::open(dir.join(&name))
        .await
        .map_err(|_| ApiError::NotFound(format!("export {id} has no file {name:?} (expired?)")))?;
    if let Some(seen) = std::fs::read(dir.join(format!("{name}.patients.json")))
        .ok()
        .and_then(|b| serde_json::from_slice::<Disclosed>(&b).ok())
    {
        slot.disclose(seen);
    }
    slot.update(|d| d.returned = Some(listed.count));
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok(with_type((StatusCode::OK, body).into_response(), NDJSON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_names_reach_the_file_system() {
        let id = uuid::Uuid::now_v7().hyphenated().to_string();
        assert!(valid_job_id(&id));
        for bad in ["..", "../x", "", "not-a-uuid", &id.to_uppercase()] {
            assert!(!valid_job_id(bad), "{bad}");
        }
        assert!(valid_file_name("Observation-12.ndjson"));
        for bad in [
            "Observation-.ndjson",
            "../Observation-1.ndjson",
            "Observation-1.ndjson.patients.json",
            "job.json",
            "Nope-1.ndjson",
        ] {
            assert!(!valid_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn prefer_respond_async_is_found_among_other_preferences() {
        let mut h = HeaderMap::new();
        assert!(!asks_async(&h));
        h.insert(
            "prefer",
            HeaderValue::from_static("handling=strict, respond-async"),
        );
        assert!(asks_async(&h));
    }

    /// Starts an export as `token`; the status URL's path.
    async fn kick_off_as(e: &crate::tests::Env, token: String, uri: &str) -> String {
        let prefer = [("prefer", "respond-async")];
        let (s, h, b) = e.call_h("GET", uri, Some(&token), None, &prefer).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{uri}: {b}");
        let status = h["content-location"].to_str().unwrap();
        status.strip_prefix("http://test").unwrap().to_string()
    }

    /// Polls the status URL until the manifest comes.
    async fn manifest_of(e: &crate::tests::Env, token: String, status: String) -> Value {
        for _ in 0..200 {
            let (s, h, b) = e.call("GET", &status, Some(&token), None).await;
            if s == StatusCode::OK {
                assert!(h.contains_key("expires"));
                return b;
            }
            assert_eq!(s, StatusCode::ACCEPTED, "{b}");
            assert!(h.contains_key("x-progress") && h.contains_key("retry-after"));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the export did not finish");
    }

    /// Starts an export as `token`, waits for it, and downloads every output file: the
    /// exported resources.
    async fn exported_resources(e: &crate::tests::Env, token: String, uri: &str) -> Vec<Value> {
        let status = kick_off_as(e, token.clone(), uri).await;
        let manifest = manifest_of(e, token.clone(), status).await;
        let mut out = Vec::new();
        for o in manifest["output"].as_array().unwrap() {
            let url = o["url"].as_str().unwrap();
            let url = url.strip_prefix("http://test").unwrap();
            let (_, _, body) = e.call_bytes("GET", url, Some(&token), None, &[]).await;
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                out.push(serde_json::from_slice(line).unwrap());
            }
        }
        out
    }

    /// Kick-off, poll, download and delete through the whole policy stack: the manifest lists
    /// what the token may read (split at `file_max_resources`), a patient-context token exports
    /// its own compartment only, the files are the starting client's alone, and each
    /// download is in every exported patient's audit report.
    #[tokio::test]
    async fn an_export_is_kicked_off_polled_downloaded_and_deleted() {
        use crate::tests::{env_with, seed};
        let mut cfg = crate::FacadeConfig::default();
        cfg.rate_limit.enabled = false;
        cfg.export.file_max_resources = 2;
        cfg.export.max_jobs_per_tenant = 4;
        let e = env_with(cfg);
        let admin = seed(&e).await;
        let prefer = [("prefer", "respond-async")];
        let kick = |token: String, uri: &'static str| kick_off_as(&e, token, uri);
        let poll = |token: String, status: String| manifest_of(&e, token, status);
        let files = |manifest: &Value| -> Vec<(String, u64, String)> {
            manifest["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    let url = o["url"].as_str().unwrap();
                    (
                        o["type"].as_str().unwrap().to_string(),
                        o["count"].as_u64().unwrap(),
                        url.strip_prefix("http://test").unwrap().to_string(),
                    )
                })
                .collect()
        };

        // The CapabilityStatement says so (Bulk Data IG: system, Patient and Group level).
        let (_, _, cap) = e.call("GET", "/fhir/metadata", None, None).await;
        assert_eq!(cap["rest"][0]["operation"][0]["name"], "export");
        let ops = |t: &str| -> Vec<String> {
            let r = cap["rest"][0]["resource"].as_array().unwrap();
            let r = r.iter().find(|r| r["type"] == t).unwrap();
            r["operation"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(ops("Patient"), ["everything", "export", "match"]);
        assert_eq!(ops("Group"), ["export"]);
        assert_eq!(ops("Observation"), ["lastn"]);

        // Refused before a job starts: no Prefer, unknown type or format or parameter, a type
        // the token may not read.
        let (s, _, _) = e.call("GET", "/fhir/$export", Some(&admin), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        for q in [
            "_type=Nope",
            "_outputFormat=text%2Fcsv",
            "patient=p1",
            "_since=2024",
        ] {
            let uri = format!("/fhir/$export?{q}");
            let (s, _, b) = e.call_h("GET", &uri, Some(&admin), None, &prefer).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {b}");
        }
        let narrow = e.token("patient/Patient.read", |r| r.patient = Some("p1".into()));
        let (s, _, _) = e
            .call_h(
                "GET",
                "/fhir/$export?_type=Observation",
                Some(&narrow),
                None,
                &prefer,
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN);

        let status = kick(admin.clone(), "/fhir/$export?_type=Patient,Observation").await;
        let manifest = poll(admin.clone(), status.clone()).await;
        assert_eq!(manifest["requiresAccessToken"], true);
        assert!(manifest["request"]
            .as_str()
            .unwrap()
            .ends_with("/fhir/$export?_type=Patient,Observation"));
        let got = files(&manifest);
        let summary: Vec<(&str, u64)> = got.iter().map(|(t, n, _)| (t.as_str(), *n)).collect();
        assert_eq!(
            summary,
            [("Observation", 2), ("Observation", 1), ("Patient", 2)]
        );
        let mut observations = Vec::new();
        for (_, n, url) in got.iter().filter(|f| f.0 == "Observation") {
            let (s, h, body) = e.call_bytes("GET", url, Some(&admin), None, &[]).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(h["content-type"], NDJSON);
            let lines: Vec<Value> = body
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect();
            assert_eq!(lines.len() as u64, *n);
            observations.extend(lines.iter().map(|o| o["id"].as_str().unwrap().to_string()));
        }
        assert_eq!(observations, ["o1", "o2", "o3"]);
        // Each download is in the report of every patient whose data it held; no PHI in them.
        let records = e.audit();
        let disclosed: Vec<&str> = records
            .iter()
            .filter(|r| r["interaction"] == "export-file" && r["kind"] == "fhir-disclosure")
            .map(|r| r["patient"].as_str().unwrap())
            .collect();
        assert!(
            disclosed.contains(&"p1") && disclosed.contains(&"p2"),
            "{disclosed:?}"
        );
        let text = serde_json::to_string(&records).unwrap();
        assert!(
            !text.contains("Smith") && !text.contains("MRN-"),
            "PHI in the audit trail"
        );

        // Another client of the tenant sees neither the job nor its files.
        let other = e.token("system/*.rs", |r| r.client_id = "other".into());
        let (s, _, _) = e.call("GET", &status, Some(&other), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = e.call("GET", &got[0].2, Some(&other), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // A patient-context token exports its compartment only, and the same app's token for
        // another patient sees neither the job nor its files.
        let mine = e.token("patient/*.rs", |r| r.patient = Some("p1".into()));
        let pstatus = kick(mine.clone(), "/fhir/Patient/$export").await;
        let manifest = poll(mine.clone(), pstatus.clone()).await;
        let theirs = e.token("patient/*.rs", |r| r.patient = Some("p2".into()));
        let (s, _, _) = e.call("GET", &pstatus, Some(&theirs), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let first = files(&manifest)[0].2.clone();
        let (s, _, _) = e.call("GET", &first, Some(&theirs), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = e.call("GET", &first, Some(&mine), None).await;
        assert_eq!(s, StatusCode::OK);
        let summary: Vec<(String, u64)> = files(&manifest)
            .into_iter()
            .map(|(t, n, _)| (t, n))
            .collect();
        assert_eq!(
            summary,
            [("Observation".to_string(), 2), ("Patient".to_string(), 1)]
        );

        // A Group's export: its active Patient members' compartments.
        let group = json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/p1"}},
                       {"entity": {"reference": "Patient/p2"}, "inactive": true}]});
        let (s, _, b) = e
            .call("PUT", "/fhir/Group/g1", Some(&admin), Some(group))
            .await;
        assert!(s.is_success(), "{b}");
        let (s, _, _) = e
            .call_h(
                "GET",
                "/fhir/Group/nope/$export",
                Some(&admin),
                None,
                &prefer,
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let gstatus = kick(admin.clone(), "/fhir/Group/g1/$export").await;
        let manifest = poll(admin.clone(), gstatus).await;
        let got_group = files(&manifest);
        let summary: Vec<(String, u64)> =
            got_group.iter().map(|(t, n, _)| (t.clone(), *n)).collect();
        assert_eq!(
            summary,
            [("Observation".to_string(), 2), ("Patient".to_string(), 1)]
        );
        let (_, _, body) = e
            .call_bytes("GET", &got_group[1].2, Some(&admin), None, &[])
            .await;
        assert!(String::from_utf8_lossy(&body).contains("\"id\":\"p1\""));

        // Three jobs kept so far; the tenant may keep four.
        kick(admin.clone(), "/fhir/$export?_type=Patient").await;
        let (s, h, b) = e
            .call_h("GET", "/fhir/$export", Some(&admin), None, &prefer)
            .await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");
        assert!(h.contains_key("retry-after"));

        // Deleting a job removes its files.
        let (s, _, _) = e.call("DELETE", &status, Some(&admin), None).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        let (s, _, _) = e.call("GET", &status, Some(&admin), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = e.call("GET", &got[0].2, Some(&admin), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    /// `_typeFilter` exports of a type only what matches one of its searches; other types whole.
    /// A filter a search would refuse, or for a type the export leaves out, is a 400.
    #[tokio::test]
    async fn type_filters_narrow_their_type_only() {
        use crate::tests::{env_with, seed};
        let mut cfg = crate::FacadeConfig::default();
        cfg.rate_limit.enabled = false;
        let e = env_with(cfg);
        let admin = seed(&e).await;
        let exported = |uri: &'static str| {
            let (e, admin) = (&e, admin.clone());
            async move {
                let mut ids: Vec<String> = exported_resources(e, admin, uri)
                    .await
                    .iter()
                    .map(|v| {
                        let s = |k: &str| v[k].as_str().unwrap().to_string();
                        format!("{}/{}", s("resourceType"), s("id"))
                    })
                    .collect();
                ids.sort();
                ids
            }
        };
        // seed: o1 (p1, laboratory), o2 (p1, vital-signs), o3 (p2, laboratory)
        assert_eq!(
            exported("/fhir/$export?_type=Patient,Observation&_typeFilter=Observation%3Fcategory%3Dlaboratory").await,
            ["Observation/o1", "Observation/o3", "Patient/p1", "Patient/p2"]
        );
        // several searches of one type: a resource matching any of them
        assert_eq!(
            exported("/fhir/$export?_type=Observation&_typeFilter=Observation%3Fcategory%3Dvital-signs,Observation%3Fsubject%3DPatient%252Fp2").await,
            ["Observation/o2", "Observation/o3"]
        );
        // all of one search's parameters; a comma inside a value (encoded) is an OR
        assert_eq!(
            exported("/fhir/$export?_type=Observation&_typeFilter=Observation%3Fcategory%3Dlaboratory%26patient%3Dp1").await,
            ["Observation/o1"]
        );
        assert_eq!(
            exported("/fhir/$export?_type=Observation&_typeFilter=Observation%3F_id%3Do1%252Co2")
                .await,
            ["Observation/o1", "Observation/o2"]
        );
        let prefer = [("prefer", "respond-async")];
        for q in [
            "_type=Observation&_typeFilter=Observation%3Fgender%3Dmale",
            "_type=Observation&_typeFilter=Observation%3Fbogus%3D1",
            "_type=Observation&_typeFilter=Observation%3Fdate%3Dyesterday",
            "_type=Observation&_typeFilter=Observation%3F_count%3D1",
            "_type=Observation&_typeFilter=Patient%3Fgender%3Dmale",
            "_type=Observation&_typeFilter=Observation",
            "_typeFilter=Subscription%3Fstatus%3Dactive",
        ] {
            let uri = format!("/fhir/$export?{q}");
            let (s, _, b) = e.call_h("GET", &uri, Some(&admin), None, &prefer).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {b}");
            assert!(
                b["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .contains("_typeFilter"),
                "{q}: {b}"
            );
        }
    }

    /// `_elements` cuts every exported resource down to the elements named for its type or for
    /// all types (and what R4 requires), tagged SUBSETTED.
    #[tokio::test]
    async fn elements_cut_exported_resources_down() {
        use crate::tests::{env_with, seed};
        let mut cfg = crate::FacadeConfig::default();
        cfg.rate_limit.enabled = false;
        let e = env_with(cfg);
        let admin = seed(&e).await;
        let exported = exported_resources(
            &e,
            admin.clone(),
            "/fhir/$export?_type=Patient,Observation&_elements=Patient.gender,subject",
        )
        .await;
        for v in &exported {
            let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            let want: &[&str] = match v["resourceType"].as_str().unwrap() {
                "Patient" => &["gender", "id", "meta", "resourceType"],
                // status and code: R4 requires them
                _ => &["code", "id", "meta", "resourceType", "status", "subject"],
            };
            assert_eq!(keys, want, "{v}");
            assert!(crate::subset::is_subsetted(v), "{v}");
        }
        let seen = exported.len();
        assert_eq!(seen, 5, "two Patients and three Observations");
        let prefer = [("prefer", "respond-async")];
        for q in [
            "_type=Patient&_elements=Patient.bogus",
            "_type=Patient&_elements=Encounter.status",
            "_type=Patient&_elements=bogus",
            "_type=Patient&_elements=Patient.name.family",
        ] {
            let uri = format!("/fhir/$export?{q}");
            let (s, _, b) = e.call_h("GET", &uri, Some(&admin), None, &prefer).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {b}");
        }
    }

    /// A type a backend FHIR server serves is not exported from the (empty) store: the manifest
    /// names it in an OperationOutcome file of its `error` list.
    #[tokio::test]
    async fn a_backend_routed_type_is_named_among_the_errors() {
        use crate::tests::{env_with, seed};
        let cfg: crate::FacadeConfig = toml::from_str(
            "[[backends]]\nname = \"lab\"\nurl = \"http://127.0.0.1:9/fhir\"\nresource_types = [\"DiagnosticReport\"]\nhealth_check_secs = 0\n",
        )
        .unwrap();
        let e = env_with(cfg);
        let admin = seed(&e).await;
        let status = kick_off_as(
            &e,
            admin.clone(),
            "/fhir/$export?_type=Observation,DiagnosticReport",
        )
        .await;
        let manifest = manifest_of(&e, admin.clone(), status).await;
        assert_eq!(manifest["output"][0]["type"], "Observation");
        assert_eq!(manifest["output"].as_array().unwrap().len(), 1);
        let error = &manifest["error"][0];
        assert_eq!(
            (&error["type"], &error["count"]),
            (&json!("OperationOutcome"), &json!(1))
        );
        let url = error["url"].as_str().unwrap()["http://test".len()..].to_string();
        let (s, _, body) = e.call_bytes("GET", &url, Some(&admin), None, &[]).await;
        assert_eq!(s, StatusCode::OK);
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("DiagnosticReport is served by backend lab"),
            "{text}"
        );
    }

    #[test]
    fn a_job_a_restart_interrupted_reports_failure() {
        let dir = tempfile::tempdir().unwrap();
        let ex = Exports::open(dir.path(), ExportConfig::default());
        let id = uuid::Uuid::now_v7().hyphenated().to_string();
        std::fs::create_dir_all(ex.job_dir(&id)).unwrap();
        let job = Job {
            tenant: "t".into(),
            client: "c".into(),
            user: None,
            patient: None,
            scopes: String::new(),
            request: "x".into(),
            transaction_time: 0,
            state: JobState::Running,
            error: None,
            output: Vec::new(),
            errors: Vec::new(),
            finished: None,
        };
        ex.save(&id, &job).unwrap();
        let ex = Exports::open(dir.path(), ExportConfig::default());
        let job = ex.load(&id).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.error.unwrap().contains("restart"));
        assert!(job.finished.is_some());
    }
}
