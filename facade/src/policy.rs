//! What a request is (its FHIR interaction, type, id) and whether the caller may do it: SMART
//! scopes per interaction and type, roles, patient compartment, break-glass. Pure functions over
//! [`Principal`] and [`FhirRequest`], so each rule is unit-tested without HTTP.

use crate::auth::Principal;
use crate::config::BreakGlassConfig;
use crate::error::ApiError;
use crate::scopes::{Grant, Perm};
use axum::http::Method;
use serde_json::Value;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interaction {
    Capabilities,
    Read,
    Vread,
    Search,
    Create,
    Update,
    /// `PATCH` with a JSON Patch: needs the update permission.
    Patch,
    Delete,
    HistoryInstance,
    HistoryType,
    /// A transaction or batch Bundle posted to the base; entries are authorized one by one.
    Transaction,
    Everything,
    /// `POST Patient/$match`: a search for the Patients a described person may be.
    Match,
    /// `GET Observation/$lastn`: a search for the newest Observations per code.
    LastN,
    /// Bulk Data `$export` kick-off (system level, or `Patient/$export`); the handler checks
    /// each exported type against the token.
    Export,
    /// Polling (`GET`) or cancelling (`DELETE`) an export job, by the client that started it.
    ExportStatus,
    /// Downloading one of an export job's NDJSON files, by the client that started it.
    ExportFile,
    /// `GET /fhir/AuditEvent`: the audit trail, for the auditor role.
    AuditQuery,
    /// Admin endpoints (`/admin/...`).
    Admin,
    Unknown,
}

impl Interaction {
    pub fn name(self) -> &'static str {
        match self {
            Interaction::Capabilities => "capabilities",
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Search => "search-type",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::Transaction => "transaction",
            Interaction::Everything => "operation-everything",
            Interaction::Match => "operation-match",
            Interaction::LastN => "operation-lastn",
            Interaction::Export => "operation-export",
            Interaction::ExportStatus => "export-status",
            Interaction::ExportFile => "export-file",
            Interaction::AuditQuery => "audit-query",
            Interaction::Admin => "admin",
            Interaction::Unknown => "unknown",
        }
    }

    pub fn is_write(self) -> bool {
        matches!(
            self,
            Interaction::Create
                | Interaction::Update
                | Interaction::Patch
                | Interaction::Delete
                | Interaction::Transaction
        )
    }

    /// The SMART permission the interaction needs on its resource type.
    pub fn perm(self) -> Option<Perm> {
        match self {
            Interaction::Read
            | Interaction::Vread
            | Interaction::HistoryInstance
            | Interaction::Everything => Some(Perm::Read),
            Interaction::Search
            | Interaction::HistoryType
            | Interaction::Match
            | Interaction::LastN => Some(Perm::Search),
            Interaction::Create => Some(Perm::Create),
            Interaction::Update | Interaction::Patch => Some(Perm::Update),
            Interaction::Delete => Some(Perm::Delete),
            _ => None,
        }
    }
}

/// The parsed shape of a request, before any handler runs.
#[derive(Clone, Debug, PartialEq)]
pub struct FhirRequest {
    pub interaction: Interaction,
    pub resource_type: Option<String>,
    pub id: Option<String>,
    /// Decoded query parameters, in order.
    pub params: Vec<(String, String)>,
}

impl FhirRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn includes(&self) -> usize {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_include") || k == "_revinclude")
            .count()
    }

    /// The patient a request is about, when the URL says so (for the audit record and checks).
    pub fn target_patient(&self) -> Option<String> {
        if self.resource_type.as_deref() == Some("Patient") {
            if let Some(id) = &self.id {
                return Some(id.clone());
            }
            if let Some(id) = self.param("_id") {
                return Some(id.to_string());
            }
        }
        for name in ["patient", "subject", "subject:Patient", "patient:Patient"] {
            if let Some(v) = self.param(name) {
                let id = v.strip_prefix("Patient/").unwrap_or(v);
                if !id.contains('/') {
                    return Some(id.to_string());
                }
            }
        }
        None
    }
}

pub fn decode_query(q: Option<&str>) -> Vec<(String, String)> {
    let Some(q) = q else { return Vec::new() };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("two ASCII hex digits");
                out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub use tributary_core::{valid_fhir_id as valid_id, valid_fhir_type as valid_type};

/// Classifies `method path?query` where `path` is relative to the FHIR base (`/Patient/1`).
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> FhirRequest {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let params = decode_query(query);
    let get = method == Method::GET || method == Method::HEAD;
    let (interaction, rtype, id) = match (segs.as_slice(), method) {
        // Subscription operations served by tributary-subscriptions (before the generic arms).
        // `$status` / `$events`: reading the subscriber's own Subscription.
        (["Subscription", id, op], _) if get && matches!(*op, "$status" | "$events") => {
            (Interaction::Read, Some("Subscription"), Some(*id))
        }
        // `$get-ws-binding-token`: a token for reading this Subscription's notifications.
        (["Subscription", id, "$get-ws-binding-token"], m) if get || m == Method::POST => {
            (Interaction::Read, Some("Subscription"), Some(*id))
        }
        (["Subscription", "$dead-letters"], _) if get => {
            (Interaction::Search, Some("Subscription"), None)
        }
        ([], m) if m == Method::POST => (Interaction::Transaction, None, None),
        (["$export"], _) if get => (Interaction::Export, None, None),
        (["Patient", "$export"], _) if get => (Interaction::Export, Some("Patient"), None),
        (["Group", id, "$export"], _) if get => (Interaction::Export, Some("Group"), Some(*id)),
        (["$export-status", _], m) if get || m == Method::DELETE => {
            (Interaction::ExportStatus, None, None)
        }
        (["$export-file", _, _], _) if get => (Interaction::ExportFile, None, None),
        (["metadata"], _) if get => (Interaction::Capabilities, None, None),
        (["AuditEvent"], _) if get => (Interaction::AuditQuery, Some("AuditEvent"), None),
        ([t], _) if get => (Interaction::Search, Some(*t), None),
        ([t, "_search"], m) if m == Method::POST => (Interaction::Search, Some(*t), None),
        (["Observation", "$lastn"], _) if get => (Interaction::LastN, Some("Observation"), None),
        (["Patient", "$match"], m) if m == Method::POST => {
            (Interaction::Match, Some("Patient"), None)
        }
        ([t], m) if m == Method::POST => (Interaction::Create, Some(*t), None),
        ([t], m) if m == Method::PUT => (Interaction::Update, Some(*t), None),
        ([t], m) if m == Method::DELETE => (Interaction::Delete, Some(*t), None),
        ([t, "_history"], _) if get => (Interaction::HistoryType, Some(*t), None),
        ([t, id], _) if get => (Interaction::Read, Some(*t), Some(*id)),
        ([t, id], m) if m == Method::PUT => (Interaction::Update, Some(*t), Some(*id)),
        ([t, id], m) if m == Method::DELETE => (Interaction::Delete, Some(*t), Some(*id)),
        ([t, id], m) if m == Method::PATCH => (Interaction::Patch, Some(*t), Some(*id)),
        ([t, id, "_history"], _) if get => (Interaction::HistoryInstance, Some(*t), Some(*id)),
        ([t, id, "$everything"], _) if get => (Interaction::Everything, Some(*t), Some(*id)),
        ([t, id, "_history", _v], _) if get => (Interaction::Vread, Some(*t), Some(*id)),
        _ => (Interaction::Unknown, None, None),
    };
    FhirRequest {
        interaction,
        resource_type: rtype.map(String::from),
        id: id.map(String::from),
        params,
    }
}

/// Types that hold no patient data of their own: a patient-context token with a scope for them
/// may read them even though they do not point at its patient.
const SHARED_TYPES: [&str; 16] = [
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "Medication",
    "Substance",
    "HealthcareService",
    "Endpoint",
    "ValueSet",
    "CodeSystem",
    "ConceptMap",
    "StructureDefinition",
    "Questionnaire",
    "ActivityDefinition",
    "PlanDefinition",
    "CapabilityStatement",
];

/// Patient ids a resource points at (itself for a Patient) — what the store's patient index
/// holds for it.
pub fn patient_links(rtype: &str, id: &str, resource: &Value) -> Vec<String> {
    if rtype == "Patient" {
        return vec![id.to_string()];
    }
    if rtype == "Subscription" {
        // A Subscription belongs to the patient its creator's token was confined to.
        return crate::subscription::patient_context(resource)
            .into_iter()
            .collect();
    }
    tributary_storage::patient_references(rtype, resource)
        .into_iter()
        .collect()
}

/// Is this resource in `patient`'s compartment (or a shared, patient-free type)? To read it, one
/// link to the patient is enough; to write it (`write`), every patient it links to must be that
/// patient — or a patient-context token could file data into another patient's record by
/// naming its own patient in a second field.
pub fn in_compartment(rtype: &str, id: &str, resource: &Value, patient: &str, write: bool) -> bool {
    let ids = patient_links(rtype, id, resource);
    if ids.is_empty() {
        rtype != "Patient" && SHARED_TYPES.contains(&rtype)
    } else if write {
        ids.iter().all(|p| p == patient)
    } else {
        ids.iter().any(|p| p == patient)
    }
}

/// The outcome of authorization, handed to handlers in the request extensions.
#[derive(Clone, Debug)]
pub struct Access {
    pub principal: Arc<Principal>,
    pub break_glass: bool,
}

impl Access {
    /// [`Access::permits`], answering a denial with [`ApiError::out_of_scope`].
    pub fn require(
        &self,
        perm: Perm,
        rtype: &str,
        id: &str,
        resource: &Value,
    ) -> Result<(), ApiError> {
        if self.permits(perm, rtype, id, resource) {
            Ok(())
        } else {
            Err(ApiError::out_of_scope())
        }
    }

    /// May the caller see (or, with a write `perm`, write) this resource? Applies scopes (with v2
    /// narrowing) and the patient compartment. Break-glass lifts both for reads.
    pub fn permits(&self, perm: Perm, rtype: &str, id: &str, resource: &Value) -> bool {
        if self.break_glass && matches!(perm, Perm::Read | Perm::Search) {
            return true;
        }
        let p = &self.principal;
        match p.scopes.grant(perm, rtype, p.patient.is_some()) {
            Grant::Denied => false,
            g @ Grant::Granted { patient_only, .. } => {
                g.admits(resource)
                    && (!patient_only
                        || p.patient.as_deref().is_some_and(|pid| {
                            let write = !matches!(perm, Perm::Read | Perm::Search);
                            in_compartment(rtype, id, resource, pid, write)
                        }))
            }
        }
    }

    /// Whether what the caller sees of `rtype` with `perm` is narrowed (patient compartment or v2
    /// search-parameter constraints), so that counts taken over everything must not reach it.
    pub fn narrowed(&self, perm: Perm, rtype: &str) -> bool {
        if self.break_glass && matches!(perm, Perm::Read | Perm::Search) {
            return false;
        }
        let p = &self.principal;
        match p.scopes.grant(perm, rtype, p.patient.is_some()) {
            Grant::Denied => true,
            Grant::Granted {
                patient_only,
                narrowing,
            } => patient_only || !narrowing.is_empty(),
        }
    }

    /// The patient a search of `rtype` must be narrowed to, if any.
    pub fn compartment_for(&self, perm: Perm, rtype: &str) -> Option<&str> {
        if self.break_glass {
            return None;
        }
        let p = &self.principal;
        match p.scopes.grant(perm, rtype, p.patient.is_some()) {
            Grant::Granted {
                patient_only: true, ..
            } => p.patient.as_deref(),
            _ => None,
        }
    }

    /// The patient whose compartment, as the store's patient index holds it, a search of `rtype`
    /// can be answered from. None for the types the index does not hold by patient, even under
    /// a patient-context token: shared types (read whole) and Subscriptions (which belong to
    /// the patient of their creator's token); those are checked resource by resource instead.
    pub fn indexed_compartment(&self, perm: Perm, rtype: &str) -> Option<&str> {
        if rtype == "Subscription" || SHARED_TYPES.contains(&rtype) {
            return None;
        }
        self.compartment_for(perm, rtype)
    }

    pub fn may(&self, perm: Perm, rtype: &str) -> bool {
        (self.break_glass && matches!(perm, Perm::Read | Perm::Search))
            || self
                .principal
                .scopes
                .grant(perm, rtype, self.principal.patient.is_some())
                .is_granted()
    }
}

/// Coarse authorization before the handler: role, scope for the interaction and type, patient
/// context against ids named in the URL, break-glass. Handlers apply [`Access::permits`] to the
/// resources themselves.
pub fn authorize(
    p: &Arc<Principal>,
    req: &FhirRequest,
    break_glass_reason: Option<&str>,
    bg: &BreakGlassConfig,
) -> Result<Access, ApiError> {
    let role = p.role_kind.as_deref();
    let mut break_glass = false;
    if let Some(reason) = break_glass_reason {
        let allowed_role = p.role.as_ref().is_some_and(|r| bg.roles.contains(r));
        if !allowed_role {
            return Err(ApiError::Forbidden(
                "break-glass is not permitted for this role".into(),
            ));
        }
        if !bg.reasons.iter().any(|r| r == reason) {
            return Err(ApiError::Forbidden(format!(
                "break-glass reason must be one of: {}",
                bg.reasons.join(", ")
            )));
        }
        if req.interaction.is_write() {
            return Err(ApiError::Forbidden(
                "break-glass grants read access only".into(),
            ));
        }
        break_glass = true;
    }
    let access = Access {
        principal: p.clone(),
        break_glass,
    };
    match req.interaction {
        Interaction::Capabilities => return Ok(access),
        // Separation of duties: the admin role manages the instance (replays, consents) and
        // does not read the trail that records what admins did.
        Interaction::AuditQuery => {
            return if role == Some("audit") {
                Ok(access)
            } else {
                Err(ApiError::Forbidden(
                    "the audit trail is for the audit role".into(),
                ))
            };
        }
        Interaction::Admin => {
            return if role == Some("admin") {
                Ok(access)
            } else {
                Err(ApiError::Forbidden("admin role required".into()))
            };
        }
        Interaction::Unknown => return Err(ApiError::NotFound("unknown FHIR endpoint".into())),
        _ => {}
    }
    if role == Some("audit") {
        return Err(ApiError::Forbidden(
            "the audit role reads audit records only".into(),
        ));
    }
    if matches!(
        req.interaction,
        Interaction::Export | Interaction::ExportStatus | Interaction::ExportFile
    ) {
        // The kick-off checks each exported type against the scopes; polling and downloads
        // are the starting client's alone (the handlers compare tenant and client).
        if break_glass {
            return Err(ApiError::Forbidden(
                "break-glass does not apply to bulk export".into(),
            ));
        }
        return if p.scopes.scopes.is_empty() {
            Err(ApiError::Forbidden(
                "token has no scope for FHIR data".into(),
            ))
        } else {
            Ok(access)
        };
    }
    if req.interaction == Interaction::Transaction {
        // Each entry is checked by the handler, which also keeps the view role to Bundles of
        // reads (a batch of GETs is a read-only app's way to save round trips); here: the
        // token must grant something.
        return if p.scopes.scopes.is_empty() {
            Err(ApiError::Forbidden(
                "token has no scope for FHIR data".into(),
            ))
        } else {
            Ok(access)
        };
    }
    if role == Some("view") && req.interaction.is_write() {
        return Err(ApiError::Forbidden("the view role cannot write".into()));
    }
    let rtype = req.resource_type.as_deref().unwrap_or("");
    let perm = req
        .interaction
        .perm()
        .ok_or_else(|| ApiError::NotFound("unknown FHIR endpoint".into()))?;
    if !access.may(perm, rtype) {
        return Err(ApiError::Forbidden(format!(
            "token scopes do not allow {} on {rtype}",
            req.interaction.name()
        )));
    }
    if req.interaction == Interaction::Everything && rtype != "Patient" {
        return Err(ApiError::NotFound(
            "$everything is supported on Patient only".into(),
        ));
    }
    // Patient context against what the URL names.
    if let Some(ctx) = access.compartment_for(perm, rtype) {
        if let Some(target) = req.target_patient() {
            if target != ctx {
                return Err(ApiError::Forbidden(
                    "outside the token's patient context".into(),
                ));
            }
        }
        if rtype == "Patient" && req.id.as_deref().is_some_and(|id| id != ctx) {
            return Err(ApiError::Forbidden(
                "outside the token's patient context".into(),
            ));
        }
    }
    Ok(access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scopes::ScopeSet;
    use serde_json::json;

    fn principal(scope: &str, patient: Option<&str>, role: Option<&str>) -> Arc<Principal> {
        Arc::new(Principal {
            client_id: "app".into(),
            user: None,
            tenant: "t".into(),
            role: role.map(String::from),
            role_kind: role.map(String::from),
            scopes: ScopeSet::parse(scope),
            scope_text: scope.into(),
            patient: patient.map(String::from),
            grant: None,
            jti: None,
            exp: i64::MAX,
        })
    }

    fn get(path: &str, q: Option<&str>) -> FhirRequest {
        classify(&Method::GET, path, q)
    }

    #[test]
    fn classifies() {
        assert_eq!(get("/Patient/1", None).interaction, Interaction::Read);
        assert_eq!(
            get("/Patient/1/_history/2", None).interaction,
            Interaction::Vread
        );
        assert_eq!(
            get("/Patient/1/$everything", None).interaction,
            Interaction::Everything
        );
        assert_eq!(
            get("/Observation", Some("patient=Patient%2F9&_count=2")).target_patient(),
            Some("9".into())
        );
        assert_eq!(
            classify(&Method::POST, "/", None).interaction,
            Interaction::Transaction
        );
        assert_eq!(
            get("/metadata", None).interaction,
            Interaction::Capabilities
        );
        assert_eq!(
            classify(&Method::PATCH, "/Patient/1", None).interaction,
            Interaction::Patch
        );
        assert_eq!(Interaction::Patch.perm(), Some(Perm::Update));
        assert_eq!(
            classify(&Method::PATCH, "/Patient", None).interaction,
            Interaction::Unknown
        );
        let cond = classify(&Method::DELETE, "/Patient", Some("identifier=a|b"));
        assert_eq!(cond.interaction, Interaction::Delete);
        assert_eq!(cond.id, None);
        let dl = get("/Subscription/$dead-letters", None);
        assert_eq!((dl.interaction, dl.id), (Interaction::Search, None));
        for op in ["$status", "$events", "$get-ws-binding-token"] {
            let r = get(&format!("/Subscription/s1/{op}"), None);
            assert_eq!(
                (r.interaction, r.id.as_deref()),
                (Interaction::Read, Some("s1"))
            );
        }
        let r = classify(
            &Method::POST,
            "/Subscription/s1/$get-ws-binding-token",
            None,
        );
        assert_eq!(r.interaction, Interaction::Read);
    }

    #[test]
    fn scope_mismatch_is_forbidden() {
        let p = principal("patient/Patient.read", Some("p1"), None);
        let bg = BreakGlassConfig::default();
        assert!(authorize(&p, &get("/Patient/p1", None), None, &bg).is_ok());
        let err = authorize(&p, &get("/Observation/o1", None), None, &bg).unwrap_err();
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn patient_context_blocks_other_patients() {
        let p = principal("patient/*.rs", Some("p1"), None);
        let bg = BreakGlassConfig::default();
        assert!(authorize(&p, &get("/Patient/p2", None), None, &bg).is_err());
        assert!(authorize(&p, &get("/Patient/p2/_history", None), None, &bg).is_err());
        assert!(authorize(
            &p,
            &get("/Observation", Some("subject=Patient/p2")),
            None,
            &bg
        )
        .is_err());
        assert!(authorize(&p, &get("/Observation", Some("patient=p1")), None, &bg).is_ok());
        let access = authorize(&p, &get("/Observation", None), None, &bg).unwrap();
        let mine = json!({"subject": {"reference": "Patient/p1"}});
        let theirs = json!({"subject": {"reference": "Patient/p2"}});
        assert!(access.permits(Perm::Read, "Observation", "o1", &mine));
        assert!(!access.permits(Perm::Read, "Observation", "o2", &theirs));
        assert!(!access.permits(Perm::Read, "Observation", "o3", &json!({})));
        assert!(access.permits(Perm::Read, "Practitioner", "d1", &json!({})));
    }

    #[test]
    fn roles_and_break_glass() {
        let bg = BreakGlassConfig::default();
        let auditor = principal("user/*.cruds", None, Some("audit"));
        assert!(authorize(&auditor, &get("/Patient/p1", None), None, &bg).is_err());
        assert!(authorize(&auditor, &get("/AuditEvent", None), None, &bg).is_ok());
        let app = principal("user/*.cruds", None, None);
        assert!(authorize(&app, &get("/AuditEvent", None), None, &bg).is_err());
        let viewer = principal("user/*.cruds", None, Some("view"));
        assert!(authorize(
            &viewer,
            &classify(&Method::DELETE, "/Patient/1", None),
            None,
            &bg
        )
        .is_err());
        let clin = principal("patient/*.rs", Some("p1"), Some("clinician"));
        assert!(authorize(&clin, &get("/Patient/p2", None), None, &bg).is_err());
        assert!(authorize(&clin, &get("/Patient/p2", None), Some("not-a-code"), &bg).is_err());
        let a = authorize(&clin, &get("/Patient/p2", None), Some("emergency"), &bg).unwrap();
        assert!(a.break_glass);
        assert!(authorize(&app, &get("/Patient/p2", None), Some("emergency"), &bg).is_err());
    }
}
