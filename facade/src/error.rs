//! One error type for every facade response that is not a success: it renders a FHIR
//! `OperationOutcome` with the right status code, and never carries internals (storage errors are
//! logged by kind and answered with a generic message).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tributary_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request itself is malformed (bad parameter, bad JSON, wrong resource type).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no credentials, or credentials that do not verify. The detail is deliberately coarse.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, but scopes, role, tenant or patient context do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such resource (or type not supported).
    #[error("{0}")]
    NotFound(String),
    /// 405
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the resource already exists, or a concurrent change conflicted.
    #[error("{0}")]
    Conflict(String),
    /// 410: the resource was deleted.
    #[error("{0}")]
    Gone(String),
    /// 412: `If-Match` did not match, or a conditional operation matched several resources.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 422: well-formed JSON that is not an acceptable FHIR resource.
    #[error("{0}")]
    Unprocessable(String),
    /// 429, with the seconds after which the client may retry.
    #[error("rate limit exceeded")]
    TooManyRequests { retry_after_secs: u64 },
    /// 502: a backend FHIR server failed.
    #[error("{0}")]
    Backend(String),
    /// 504: a backend FHIR server did not answer in time.
    #[error("{0}")]
    BackendTimeout(String),
    /// 503: the request took longer than `http.request_timeout_secs` and was abandoned.
    #[error("{0}")]
    Timeout(String),
    /// 500: anything internal. The detail is logged (no PHI: storage errors carry ids only) and
    /// the client sees a generic message.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The 403 for a resource outside the caller's scopes or patient compartment. One message for
    /// every such denial: it names neither the resource nor the patient.
    pub fn out_of_scope() -> ApiError {
        ApiError::Forbidden("outside the token's scopes or patient context".into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Backend(_) => StatusCode::BAD_GATEWAY,
            ApiError::BackendTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OperationOutcome `issue.code` (FHIR IssueType).
    fn issue_code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "invalid",
            ApiError::Unauthorized(_) => "login",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed(_) => "not-supported",
            ApiError::Conflict(_) => "conflict",
            ApiError::Gone(_) => "deleted",
            ApiError::PreconditionFailed(_) => "conflict",
            ApiError::Unprocessable(_) => "processing",
            ApiError::TooManyRequests { .. } => "throttled",
            ApiError::Backend(_) => "transient",
            ApiError::BackendTimeout(_) | ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "exception",
        }
    }

    /// The text a client sees.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".into(),
            ApiError::TooManyRequests { retry_after_secs } => {
                format!("rate limit exceeded; retry after {retry_after_secs} s")
            }
            other => other.to_string(),
        }
    }

    /// A short kind for the audit record (`outcome_detail`), never a message with data in it.
    pub fn kind(&self) -> &'static str {
        self.issue_code()
    }
}

/// A FHIR OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, text: &str) -> serde_json::Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}]
    })
}

pub const FHIR_JSON: &str = "application/fhir+json";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error answered 500");
        }
        let status = self.status();
        let body = operation_outcome("error", self.issue_code(), &self.public_message());
        let mut res = (status, body.to_string()).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        match &self {
            ApiError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tributary\""),
                );
            }
            ApiError::TooManyRequests { retry_after_secs } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                    h.insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        res.extensions_mut().insert(ErrorKind(self.kind()));
        res
    }
}

/// Attached to error responses so the audit layer can record why without parsing the body.
#[derive(Clone, Copy, Debug)]
pub struct ErrorKind(pub &'static str);

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::VersionConflict {
                expected, current, ..
            } => ApiError::PreconditionFailed(format!(
                "version conflict: If-Match expected version {expected}, current is {current}"
            )),
            StorageError::AlreadyExists { resource } => {
                ApiError::Conflict(format!("{resource} already exists"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_errors_do_not_leak() {
        let res = ApiError::Internal("fjall: /secret/path corrupt".into()).into_response();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("OperationOutcome"));
    }

    #[test]
    fn status_codes() {
        assert_eq!(ApiError::Gone("x".into()).status(), 410);
        assert_eq!(ApiError::PreconditionFailed("x".into()).status(), 412);
        assert_eq!(ApiError::Unprocessable("x".into()).status(), 422);
        let res = ApiError::TooManyRequests {
            retry_after_secs: 3,
        }
        .into_response();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "3");
    }
}
