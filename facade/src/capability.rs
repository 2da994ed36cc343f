//! Discovery: the CapabilityStatement (`/fhir/metadata`, public), the SMART configuration and
//! the local JWKS. The CapabilityStatement lists what this server actually does, no more.

use crate::search::SEARCH_PARAMS;
use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use serde_json::{json, Value};

/// FHIR R4 (4.0.1) resource types, sorted.
pub const RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport";

fn resource_entry(t: &str, routed: bool, topics: &[String]) -> Value {
    if t == "AuditEvent" {
        return json!({
            "type": "AuditEvent",
            "documentation": "The facade's own audit trail, for the audit role only; read-only.",
            "interaction": [{"code": "search-type"}],
            "searchParam": [
                {"name": "patient", "type": "reference"},
                {"name": "date", "type": "date"},
                {"name": "agent", "type": "token"},
                {"name": "entity", "type": "reference"},
                {"name": "type", "type": "token"},
                {"name": "subtype", "type": "token"},
                {"name": "action", "type": "token"},
                {"name": "outcome", "type": "token"}
            ]
        });
    }
    // Types served by a backend FHIR server get neither patch, conditional update nor
    // conditional delete (their target cannot be checked against the caller's access first).
    let mut codes = vec![
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ];
    if routed {
        codes.retain(|c| *c != "patch");
    }
    let interactions: Vec<Value> = codes.iter().map(|c| json!({"code": c})).collect();
    let params: Vec<Value> = SEARCH_PARAMS
        .iter()
        .filter(|(n, _)| crate::search::supports(t, n))
        .map(|(n, ty)| match *n {
            "patient" | "subject" if t != "Patient" => json!({"name": n, "type": ty,
                "documentation": format!("Also chained to one Patient search parameter: {n}.identifier=system|value, {n}.name=…, {n}.birthdate=… (at most {} Patients)", crate::search::MAX_CHAINED)}),
            _ if *ty == "reference" && !matches!(*n, "patient" | "subject") => json!({"name": n, "type": ty,
                "documentation": format!("Also chained, one link, to a search parameter of the type it points at: {n}:<Type>.<parameter>=… ({n}.<parameter>=… where it points at one type; at most {} of them)", crate::search::MAX_CHAINED)}),
            _ => json!({"name": n, "type": ty}),
        })
        .collect();
    let mut r = json!({
        "type": t,
        "interaction": interactions,
        "versioning": "versioned",
        "readHistory": true,
        "updateCreate": true,
        "conditionalCreate": true,
        "conditionalUpdate": !routed,
        "conditionalDelete": if routed { "not-supported" } else { "single" },
        "conditionalRead": if routed { "not-supported" } else { "full-support" },
        "searchInclude": [format!("{t}:*")],
        "searchRevInclude": crate::search::rev_includes_of(t, RESOURCE_TYPES),
        "searchParam": params,
    });
    if !routed {
        r["documentation"] = json!("Search also takes _has:<type>:<reference>:<parameter> (reverse chaining, one level, through a type of the built-in store).");
    }
    if t == "Observation" {
        r["operation"] = json!([{"name": "lastn", "definition": "http://hl7.org/fhir/OperationDefinition/Observation-lastn"}]);
    }
    if t == "Patient" {
        r["operation"] = json!([
            {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"},
            {"name": "match", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match"}
        ]);
    }
    // R4 Subscriptions Backport: the topics a client can subscribe to, and the operations.
    if t == "Group" {
        r["operation"] = json!([{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]);
    }
    if t == "Subscription" && !topics.is_empty() {
        r["extension"] = topics
            .iter()
            .map(|url| json!({"url": format!("{BACKPORT}/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"), "valueCanonical": url}))
            .collect();
        r["operation"] = ["status", "events", "get-ws-binding-token"]
            .iter()
            .map(|op| json!({"name": op, "definition": format!("{BACKPORT}/OperationDefinition/backport-subscription-{op}")}))
            .collect();
    }
    r
}

pub async fn metadata(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let base = crate::rest::base_url(&st, &headers);
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .filter(|t| !matches!(**t, "Bundle" | "OperationOutcome" | "Parameters"))
        .map(|t| {
            let routed = st.facade.backends.routes_type(t);
            resource_entry(t, routed, &st.facade.subscription_topics)
        })
        .collect();
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": st.facade.configured_at,
        "kind": "instance",
        "software": {"name": "Tributary", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Tributary FHIR facade", "url": base},
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        // JSON Patch, and FHIRPath Patch as a Parameters resource
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
                "description": "Bearer JWT (ES256/RS256). SMART v1 and v2 scopes; patient-context tokens are narrowed to the patient compartment. Every request is audited."
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}],
        }]
    });
    crate::rest::json_response(
        axum::http::StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

pub async fn smart_configuration(State(st): State<AppState>, headers: HeaderMap) -> Json<Value> {
    let base = crate::rest::base_url(&st, &headers);
    let root = base.trim_end_matches("/fhir").to_string();
    let cfg = &st.facade.cfg.auth;
    // Only what the configured authorization server is said to offer: a client library that
    // reads a capability or grant type here will try it.
    let mut capabilities = vec![
        "permission-v1",
        "permission-v2",
        "permission-patient",
        "permission-user",
    ];
    let methods = &cfg.token_endpoint_auth_methods;
    if methods.iter().any(|m| m == "private_key_jwt") {
        capabilities.push("client-confidential-asymmetric");
    }
    if methods
        .iter()
        .any(|m| m == "client_secret_basic" || m == "client_secret_post")
    {
        capabilities.push("client-confidential-symmetric");
    }
    let mut grants = Vec::new();
    let mut pkce = Vec::new();
    if !cfg.authorization_endpoint.is_empty() {
        grants.push("authorization_code");
        pkce.push("S256");
    }
    if !cfg.token_endpoint.is_empty() {
        grants.push("client_credentials");
    }
    let mut v = json!({
        "issuer": cfg.issuers.first(),
        "scopes_supported": ["patient/*.rs", "user/*.cruds", "system/*.cruds", "patient/*.read", "user/*.read", "user/*.write", "system/*.*"],
        "capabilities": capabilities,
        "code_challenge_methods_supported": pkce,
        "grant_types_supported": grants,
        "token_endpoint_auth_methods_supported": methods,
    });
    for (key, url) in [
        ("token_endpoint", &cfg.token_endpoint),
        ("authorization_endpoint", &cfg.authorization_endpoint),
    ] {
        if !url.is_empty() {
            v[key] = json!(url);
        }
    }
    if st.facade.local_key.is_some() {
        v["jwks_uri"] = json!(format!("{root}/.well-known/jwks.json"));
    } else if !cfg.jwks_url.is_empty() {
        v["jwks_uri"] = json!(cfg.jwks_url);
    }
    Json(v)
}

pub async fn jwks(State(st): State<AppState>) -> Json<Value> {
    let keys: Vec<Value> = st.facade.local_key.iter().map(|k| k.jwk()).collect();
    Json(json!({"keys": keys}))
}

#[cfg(test)]
mod tests {
    #[test]
    fn types_are_sorted() {
        let mut sorted = super::RESOURCE_TYPES.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, super::RESOURCE_TYPES);
    }
}
