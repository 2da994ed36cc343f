//! The HTTP listener for the facade, the Subscriptions endpoints, `/health`, `/ready` and
//! `/metrics`.
//!
//! `axum::serve` sets no timer and no bound: a client that connects and sends nothing, stops in
//! the middle of a request head, or leaves a keep-alive connection open holds a socket and a task
//! for as long as it likes, and any number of them may. This loop bounds both:
//! - at most `http.max_connections` at once; one more is closed as it is accepted (and logged);
//! - a connection with no traffic in either direction for `http.idle_timeout_secs`, or whose
//!   request head is not complete within it, is closed. A request still being answered gets its
//!   response first (a graceful close; `http.request_timeout_secs` bounds the request).
//!
//! With `[http.tls]` every connection is TLS (rustls, TLS 1.2 and 1.3; the handshake must finish
//! within the idle timeout; certificate files are reloaded when they change, as for MLLP).
//!
//! Connections upgraded to WebSocket leave this loop: their channel keeps its own ping and
//! queue bounds.

use crate::tls::ReloadingAcceptor;
use crate::Metrics;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

const CONNECTIONS: &str = "tributary_http_connections_total";
const CLOSED: &str = "tributary_http_connections_closed_total";

/// A request extension on every request that arrived over TLS on this listener (for links that
/// must name the scheme the client used).
#[derive(Clone, Copy, Debug)]
pub struct Secure;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown`, then closes every
/// connection gracefully and returns once they are gone. `metrics` counts connections
/// (`tributary_http_connections_total{outcome=accepted|refused}`) and the ones closed for
/// silence or a failed TLS handshake (`tributary_http_connections_closed_total{reason}`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<ReloadingAcceptor>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let refusals = crate::LogThrottle::new(crate::log_throttle::REFUSAL_LOG_INTERVAL);
    if let Some(tls) = tls.clone() {
        connections.spawn(tls.keep_reloaded("http".into(), shutdown.clone()));
    }
    loop {
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.inc(CONNECTIONS, &[("outcome", "refused")]);
            if let Some(not_logged) = refusals.hit() {
                tracing::warn!(
                    max = limits.max_connections,
                    refused_since_last_line = not_logged + 1,
                    "http connection limit reached; closing new connections (logged at most every 10 s, every one counted in /metrics)"
                );
            }
            continue;
        };
        metrics.inc(CONNECTIONS, &[("outcome", "accepted")]);
        let _ = stream.set_nodelay(true);
        let secure = tls.is_some();
        let service = TowerToHyperService::new(app.clone().map_request(
            move |r: axum::http::Request<Incoming>| {
                let mut r = r.map(axum::body::Body::new);
                if secure {
                    r.extensions_mut().insert(Secure);
                }
                r
            },
        ));
        let shutdown = shutdown.clone();
        let tls = tls.as_ref().map(ReloadingAcceptor::acceptor);
        let metrics = metrics.clone();
        connections.spawn(async move {
            let _permit = permit;
            let idle = limits.idle_timeout;
            let activity = Activity::new();
            let stream = Watched {
                inner: stream,
                activity: activity.clone(),
            };
            let silent = match tls {
                None => serve_connection(stream, activity, service, idle, shutdown).await,
                Some(tls) => match tokio::time::timeout(idle, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(stream, activity, service, idle, shutdown).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "http TLS handshake failed");
                        metrics.inc(CLOSED, &[("reason", "tls_handshake")]);
                        false
                    }
                    Err(_) => {
                        tracing::debug!("http TLS handshake not finished within the idle timeout");
                        metrics.inc(CLOSED, &[("reason", "tls_handshake")]);
                        false
                    }
                },
            };
            if silent {
                metrics.inc(CLOSED, &[("reason", "idle")]);
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it ends; `true` when it was closed for silence (by the idle
/// check, or by hyper because a request head was not complete in time).
async fn serve_connection<I, S>(
    stream: I,
    activity: Activity,
    service: S,
    idle: Duration,
    shutdown: CancellationToken,
) -> bool
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            axum::http::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = TokioIo::new(stream);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut check = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    let mut silent = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                // hyper closes a connection whose request head is not complete in time itself.
                let head_timeout = ended.err().is_some_and(|e| {
                    e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
                });
                return silent || head_timeout;
            }
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = check.tick(), if !closing => {
                if activity.quiet_for() >= idle {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    silent = true;
                }
            }
        }
    }
}

/// When a connection last moved a byte either way.
#[derive(Clone)]
struct Activity {
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// A socket that records its traffic in an [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
