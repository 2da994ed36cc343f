//! A subscriber's rest-hook endpoint for tests: a real HTTP server on a free loopback port that
//! keeps every notification Bundle it receives. Shared by this crate's tests and the end-to-end
//! tests (`#[path]`-included there).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use tributary_subscriptions::bundle::read_status;

pub type Got = Arc<Mutex<Vec<Value>>>;

async fn record(State(got): State<Got>, Json(b): Json<Value>) -> StatusCode {
    got.lock().unwrap().push(b);
    StatusCode::OK
}

/// Starts the endpoint; returns what it receives and its URL (`http://127.0.0.1:PORT/hook`).
pub async fn start_hook() -> (Got, String) {
    let got: Got = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", l.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(record))
        .with_state(got.clone());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (got, hook)
}

/// (event number, focus) of every event notified so far.
#[allow(dead_code)] // not every including test reads event numbers
pub fn notified(got: &Got) -> Vec<(u64, Option<String>)> {
    got.lock()
        .unwrap()
        .iter()
        .filter_map(read_status)
        .filter(|(kind, _)| kind == "event-notification")
        .flat_map(|(_, events)| events)
        .collect()
}
