//! The gateway facade: `fn app(state) -> Router`.
//!
//! Today it serves the operational endpoints (`/health`, `/ready`); the FHIR R4 API and its policy
//! layers (authenticate → authorize → rate limit → audit) are added on the same router.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tributary_runtime::Runtime;

/// Everything the handlers need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub rt: Runtime,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(state)
}

/// Liveness: the process is up and its HTTP loop answers.
async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: the store is open and every configured component reported ready.
async fn ready(State(state): State<AppState>) -> Response {
    let components = state.rt.readiness.snapshot();
    let ready = state.rt.readiness.all_ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "components": components,
        "journal": { "head_seq": state.rt.journal.stats().head_seq },
    });
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::sync::Arc;
    use tower::ServiceExt;
    use tributary_runtime::{ComponentStatus, Readiness};
    use tributary_storage::{AuditLog, Db, DbOptions, FjallJournal, FjallStore};

    fn state(dir: &std::path::Path) -> AppState {
        let db = Db::open(dir, DbOptions::default()).unwrap();
        AppState {
            rt: Runtime {
                journal: Arc::new(FjallJournal::new(db.clone(), 0)),
                store: Arc::new(FjallStore::new(db.clone())),
                audit: AuditLog::new(db.clone()),
                db,
                readiness: Readiness::default(),
                shutdown: Default::default(),
            },
        }
    }

    #[tokio::test]
    async fn ready_reflects_components() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path());
        st.rt.readiness.set("store", ComponentStatus::Ready);
        st.rt.readiness.set("mllp", ComponentStatus::Starting);
        let req = || Request::get("/ready").body(Body::empty()).unwrap();
        let res = app(st.clone()).oneshot(req()).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        st.rt.readiness.set("mllp", ComponentStatus::Ready);
        let res = app(st.clone()).oneshot(req()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = app(st)
            .oneshot(Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}
