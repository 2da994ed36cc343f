//! The websocket channel (R4 Backport IG / R5 `websocket`): a client that may read a
//! Subscription asks `$get-ws-binding-token` (behind the facade's policy stack) for a
//! short-lived, single-use token for that one Subscription, connects to
//! `<path_prefix>/subscription-ws`, and sends `bind-with-token <token>`. It then receives the
//! handshake Bundle, heartbeats and `event-notification` Bundles — built and filtered exactly
//! like rest-hook notifications by the subscription's worker ([`crate::engine`]).
//!
//! Bounded: the bind must arrive within `ws_bind_timeout_secs`; each connection has a send
//! queue of `ws_queue_bound` messages — a client that falls behind is disconnected (close code
//! 1008), never buffered for; a write that takes longer than `request_timeout_ms` or a peer that
//! answers no ping for three ping periods ends the connection. Events that arrive while no
//! client is bound are not queued: `$events` serves them.

use crate::api::ApiState;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest message a client may send (`bind-with-token <64 hex digits>` fits many times).
const MAX_CLIENT_MESSAGE: usize = 4096;
/// Most binding tokens outstanding at once; past it, issuing answers 503.
const MAX_TOKENS: usize = 10_000;

/// What a binding token grants: one Subscription of one tenant, until `expires_ms`.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub tenant: String,
    pub subscription: String,
    pub expires_ms: i64,
    /// The SMART client (and its patient context) that asked for the token: for the audit.
    pub client: Option<String>,
    pub patient: Option<String>,
}

/// Outstanding binding tokens (in memory: a restart voids them, clients ask again).
#[derive(Default)]
pub struct BindingTokens {
    tokens: Mutex<HashMap<String, Binding>>,
}

impl BindingTokens {
    /// A new random token for `tenant`/`subscription`, valid for `ttl`. `None` when too many
    /// are outstanding.
    pub fn issue(
        &self,
        tenant: &str,
        subscription: &str,
        client: Option<String>,
        patient: Option<String>,
        ttl: Duration,
    ) -> Option<(String, i64)> {
        let now = tributary_core::now_millis();
        let mut map = self.tokens.lock().ok()?;
        if map.len() >= MAX_TOKENS {
            map.retain(|_, b| b.expires_ms > now);
            if map.len() >= MAX_TOKENS {
                return None;
            }
        }
        let bytes: [u8; 32] = rand::random();
        let token = hex::encode(bytes);
        let expires_ms = now.saturating_add(ttl.as_millis() as i64);
        map.insert(
            token.clone(),
            Binding {
                tenant: tenant.to_string(),
                subscription: subscription.to_string(),
                expires_ms,
                client,
                patient,
            },
        );
        Some((token, expires_ms))
    }

    /// Takes the token (single use). `None` when unknown, used or expired.
    pub fn take(&self, token: &str) -> Option<Binding> {
        let now = tributary_core::now_millis();
        let b = self.tokens.lock().ok()?.remove(token)?;
        (b.expires_ms > now).then_some(b)
    }
}

/// One bound connection as the subscription's worker sees it.
pub(crate) struct WsClient {
    pub id: u64,
    pub tx: mpsc::Sender<String>,
    /// Cancelled by the worker when the client's queue is full (too slow).
    pub slow: CancellationToken,
}

/// `GET <path_prefix>/subscription-ws`: upgrades to a websocket.
pub(crate) async fn upgrade(State(state): State<ApiState>, ws: WebSocketUpgrade) -> Response {
    let Ok(slot) = state.service.ws_slots.clone().try_acquire_owned() else {
        tracing::warn!(
            max = state.service.cfg.ws_max_connections,
            "websocket refused: ws_max_connections open"
        );
        let mut res = (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::CONTENT_TYPE, "application/fhir+json")],
            error_text(
                "transient",
                "too many websocket connections open; retry later",
            ),
        )
            .into_response();
        res.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("5"),
        );
        return res;
    };
    ws.max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| async move {
            connection(state, socket).await;
            drop(slot);
        })
}

fn error_text(code: &str, text: &str) -> String {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    })
    .to_string()
}

/// Sends an OperationOutcome and closes with 1008 (policy violation) and a short reason.
async fn refuse(socket: &mut WebSocket, code: &str, text: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = socket
            .send(Message::Text(error_text(code, text).into()))
            .await;
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: 1008,
                reason: text.chars().take(120).collect::<String>().into(),
            })))
            .await;
    })
    .await;
}

async fn connection(state: ApiState, mut socket: WebSocket) {
    let svc = state.service.clone();
    let cfg = &svc.cfg;
    // 1. The bind, within the bind timeout.
    let first =
        tokio::time::timeout(Duration::from_secs(cfg.ws_bind_timeout_secs), socket.recv()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        Ok(Some(Ok(_))) => {
            return refuse(&mut socket, "invalid", "expected `bind-with-token <token>`").await
        }
        Ok(_) => return,
        Err(_) => {
            return refuse(
                &mut socket,
                "timeout",
                "no `bind-with-token` within the bind timeout",
            )
            .await
        }
    };
    let Some(token) = text.trim().strip_prefix("bind-with-token ").map(str::trim) else {
        return refuse(&mut socket, "invalid", "expected `bind-with-token <token>`").await;
    };
    let Some(binding) = svc.ws_tokens.take(token) else {
        tracing::info!("websocket bind refused: unknown, used or expired token");
        svc.audit_ws(None, "websocket-bind", 401, "bad-binding-token", 0)
            .await;
        return refuse(
            &mut socket,
            "security",
            "binding token unknown, already used or expired",
        )
        .await;
    };
    let (client_id, mut rx, slow) = match svc.bind_ws(&binding).await {
        Ok(x) => x,
        Err(reason) => {
            svc.audit_ws(Some(&binding), "websocket-bind", 409, "not-bindable", 0)
                .await;
            return refuse(&mut socket, "processing", &reason).await;
        }
    };
    // Audited (durably) before the first notification leaves.
    svc.audit_ws(Some(&binding), "websocket-bind", 200, "bound", 0)
        .await;
    let mut sent: u64 = 0;
    tracing::info!(subscription = %binding.subscription, tenant = %binding.tenant, client = client_id, "websocket bound");

    // 2. Deliver until the client leaves, falls behind, stops answering, or we shut down.
    let write_timeout = Duration::from_millis(cfg.request_timeout_ms);
    let ping_every = Duration::from_secs(cfg.ws_ping_secs);
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    let mut last_heard = Instant::now();
    let shutdown = svc.shutdown.clone();
    let outcome: &str = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(write_timeout, socket.send(Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "server shutting down".into(),
                })))).await;
                break "shutdown";
            }
            _ = slow.cancelled() => {
                refuse(&mut socket, "throttled", "client too slow: notifications were not read in time; catch up with $events").await;
                break "too slow";
            }
            msg = rx.recv() => {
                let Some(msg) = msg else {
                    refuse(&mut socket, "processing", "the subscription is no longer active").await;
                    break "subscription ended";
                };
                match tokio::time::timeout(write_timeout, socket.send(Message::Text(msg.into()))).await {
                    Ok(Ok(())) => sent += 1,
                    Ok(Err(_)) => break "send failed",
                    Err(_) => break "send timed out",
                }
            }
            incoming = socket.recv() => {
                match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break "client closed",
                    Some(Ok(Message::Text(t))) if t.trim().starts_with("bind-with-token") => {
                        // One subscription per connection: open another connection for another.
                        let answer = Message::Text(error_text("not-supported", "this connection is already bound; open another connection to bind another subscription").into());
                        if !matches!(tokio::time::timeout(write_timeout, socket.send(answer)).await, Ok(Ok(()))) {
                            break "send timed out";
                        }
                        last_heard = Instant::now();
                    }
                    Some(Ok(_)) => last_heard = Instant::now(),
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every * 3 {
                    break "peer unresponsive";
                }
                if tokio::time::timeout(write_timeout, socket.send(Message::Ping(Vec::new().into()))).await.is_err() {
                    break "send timed out";
                }
            }
        }
    };
    svc.unbind_ws(&binding, client_id);
    svc.audit_ws(Some(&binding), "websocket-close", 200, outcome, sent)
        .await;
    tracing::info!(subscription = %binding.subscription, tenant = %binding.tenant, client = client_id, outcome, "websocket closed");
}

/// The `$get-ws-binding-token` answer.
pub(crate) fn token_parameters(
    token: &str,
    expires_ms: i64,
    subscription: &str,
    url: &str,
) -> Value {
    json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "token", "valueString": token},
            {"name": "expiration", "valueDateTime": tributary_core::format_rfc3339_millis(expires_ms)},
            {"name": "subscription", "valueString": format!("Subscription/{subscription}")},
            {"name": "websocket-url", "valueUrl": url},
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_and_expire() {
        let t = BindingTokens::default();
        let (tok, _) = t
            .issue("t1", "s1", None, None, Duration::from_secs(60))
            .unwrap();
        assert_eq!(tok.len(), 64);
        let b = t.take(&tok).unwrap();
        assert_eq!((b.tenant.as_str(), b.subscription.as_str()), ("t1", "s1"));
        assert!(t.take(&tok).is_none(), "a token binds once");
        let (old, _) = t.issue("t1", "s1", None, None, Duration::ZERO).unwrap();
        assert!(t.take(&old).is_none(), "an expired token does not bind");
        assert!(t.take("nope").is_none());
    }
}
