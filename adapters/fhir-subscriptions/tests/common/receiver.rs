//! A subscriber's rest-hook endpoint that can be taken down for real (its port closed) and
//! brought back on the same port, optionally over HTTPS. Shared by this crate's tests and the
//! end-to-end tests (`#[path]`-included there).
#![allow(dead_code)] // not every including test uses every accessor

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_runtime::http_server;
use tributary_runtime::tls::ReloadingAcceptor;
use tributary_subscriptions::bundle::read_status;

/// The `Authorization` value every notification must carry: subscriptions name it in
/// `channel.header`, and the receiver refuses to record a Bundle without it.
pub const RECEIVER_AUTH: &str = "Bearer sub-secret";

/// A subscriber endpoint that records every Bundle it receives; can be taken down for real
/// (its port closed) and brought back on the same port.
pub struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Value>>>,
    pub status: Arc<Mutex<StatusCode>>,
    stop: Option<CancellationToken>,
    /// Serves HTTPS with this certificate when set.
    tls: Option<ReloadingAcceptor>,
}

type ReceiverState = (Arc<Mutex<Vec<Value>>>, Arc<Mutex<StatusCode>>);

async fn record(
    State((got, status)): State<ReceiverState>,
    headers: axum::http::HeaderMap,
    Json(b): Json<Value>,
) -> StatusCode {
    let code = *status.lock().unwrap();
    if code.is_success() {
        assert_eq!(
            headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some(RECEIVER_AUTH),
            "channel.header is sent"
        );
        got.lock().unwrap().push(b);
    }
    code
}

impl Receiver {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    pub async fn start_with(tls: Option<ReloadingAcceptor>) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut r = Self {
            port,
            got: Arc::default(),
            status: Arc::new(Mutex::new(StatusCode::OK)),
            stop: None,
            tls,
        };
        r.serve(l);
        r
    }

    fn serve(&mut self, l: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/hook", post(record))
            .with_state((self.got.clone(), self.status.clone()));
        let stop = CancellationToken::new();
        let limits = http_server::Limits {
            idle_timeout: Duration::from_secs(30),
            max_connections: 100,
        };
        tokio::spawn(http_server::serve(
            l,
            app,
            limits,
            self.tls.clone(),
            Default::default(),
            stop.clone(),
        ));
        self.stop = Some(stop);
    }

    pub fn down(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
    }

    pub async fn up(&mut self) {
        for _ in 0..100 {
            if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                self.serve(l);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not rebind the receiver port");
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}/hook", self.port),
            None => format!("http://127.0.0.1:{}/hook", self.port),
        }
    }

    pub fn bundles(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }

    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        self.bundles()
            .into_iter()
            .filter(|b| read_status(b).map(|s| s.0) == Some(kind.to_string()))
            .collect()
    }

    /// The type of every notification received (heartbeats left out), in arrival order.
    pub fn kinds(&self) -> Vec<String> {
        self.bundles()
            .iter()
            .filter_map(|b| read_status(b).map(|s| s.0))
            .filter(|k| k != "heartbeat")
            .collect()
    }

    /// (event number, focus reference) of every event notified, in arrival order.
    pub fn events(&self) -> Vec<(u64, Option<String>)> {
        self.of_type("event-notification")
            .iter()
            .flat_map(|b| read_status(b).unwrap().1)
            .collect()
    }
}
