//! The MLLP listener: accept, identify the partner, read frames, journal, acknowledge.
//!
//! Per connection, messages are handled one at a time: the next frame is not read until the
//! previous message is durable and its ACK written. That is the backpressure — when the journal
//! lags, reads stop and TCP flow control slows the sender; nothing is buffered beyond one frame
//! (bounded by `max_frame_bytes`). Timeouts bound every wait: idle between messages, read once a
//! frame started (slow-drip clients), write of the ACK (clients that never read).
//!
//! Logs and audit records carry the listener, partner, remote address, message id, message type
//! and outcome — never payload bytes, patient data or identifiers.

use crate::ack::{self, AckError, Outcome};
use crate::app_ack::{AppAckJob, AppAckType, AppAcks, ConnTx, ConnWrite};
use crate::codec::{InboundBudget, MllpCodec, MllpFrame};
use crate::config::{AckAfter, BatchCountMismatch, MllpListenerConfig};
use crate::header::{self, ascii_lossy, Header};
use crate::partners::{Partner, Partners, PeerIdentity};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tributary_core::{Envelope, MessageId, Protocol, StateKind};
use tributary_runtime::log_throttle::{LogThrottle, REFUSAL_LOG_INTERVAL};
use tributary_runtime::tls::{ReloadingAcceptor, TlsError};
use tributary_runtime::{ComponentStatus, ProcessedFeed, ProcessedOutcome, Runtime, Source};
use tributary_storage::{AuditLog, Journal};

#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("listener {listener}: {source}")]
    Tls { listener: String, source: TlsError },
}

/// What the mapping pipeline reports for `ack_after = "mapped"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplicationOutcome {
    /// Mapped (or further along).
    Processed,
    /// Mapping failed; `field` is the source field at fault (`PID-3`) when known.
    Failed {
        reason: String,
        field: Option<String>,
    },
    /// Not finished within the wait; the message is stored and will be processed.
    Pending,
}

/// The hook the pipeline provides so the listener can send application ACKs after mapping.
#[async_trait]
pub trait ApplicationAck: Send + Sync + 'static {
    async fn wait_processed(&self, id: MessageId, timeout: Duration) -> ApplicationOutcome;
}

/// Default [`ApplicationAck`]: learns the outcome from the pipeline's [`ProcessedFeed`] when it
/// has one, and from the message's journal state (checked at the start, after a lagged feed,
/// and every few seconds) — so a missed announcement only delays the answer.
pub struct JournalStateAck {
    journal: Arc<dyn Journal>,
    feed: Option<ProcessedFeed>,
    poll: Duration,
}

impl JournalStateAck {
    pub fn new(journal: Arc<dyn Journal>) -> Self {
        Self {
            journal,
            feed: None,
            poll: Duration::from_millis(20),
        }
    }

    pub fn with_feed(mut self, feed: ProcessedFeed) -> Self {
        self.feed = Some(feed);
        self
    }

    fn check(&self, id: MessageId) -> Option<ApplicationOutcome> {
        let st = self.journal.state(id).ok()??;
        match st.state.kind() {
            StateKind::Mapped | StateKind::Committed | StateKind::Delivered => {
                Some(ApplicationOutcome::Processed)
            }
            StateKind::Failed | StateKind::Rejected => {
                let reason = st.state.reason().unwrap_or("").to_string();
                Some(ApplicationOutcome::Failed {
                    field: field_in(&reason),
                    reason,
                })
            }
            StateKind::Received => None,
        }
    }
}

/// First `SEG-n` token in a text (a mapping error's source path), e.g. `PID-3`.
pub fn field_in(reason: &str) -> Option<String> {
    reason
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        .find_map(|tok| {
            let (seg, rest) = tok.split_once(['-', '.'])?;
            let num: String = rest.chars().take_while(char::is_ascii_digit).collect();
            (seg.len() == 3
                && seg.chars().next()?.is_ascii_uppercase()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                && !num.is_empty())
            .then(|| format!("{seg}-{num}"))
        })
}

#[async_trait]
impl ApplicationAck for JournalStateAck {
    async fn wait_processed(&self, id: MessageId, timeout: Duration) -> ApplicationOutcome {
        use tokio::sync::broadcast::error::RecvError;
        let deadline = Instant::now() + timeout;
        // subscribe before the first look, so an outcome published in between is not missed
        let mut feed = self.feed.as_ref().map(ProcessedFeed::subscribe);
        let mut poll = self.poll;
        loop {
            if let Some(o) = self.check(id) {
                return o;
            }
            let now = Instant::now();
            if now >= deadline {
                return ApplicationOutcome::Pending;
            }
            let left = deadline - now;
            let Some(rx) = feed.as_mut() else {
                tokio::time::sleep(poll.min(left)).await;
                poll = (poll * 2).min(Duration::from_millis(500));
                continue;
            };
            let until = tokio::time::Instant::now() + left.min(Duration::from_secs(5));
            loop {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Ok(p)) if p.id == id => {
                        return match p.outcome {
                            ProcessedOutcome::Committed => ApplicationOutcome::Processed,
                            ProcessedOutcome::Failed { reason } => ApplicationOutcome::Failed {
                                field: field_in(&reason),
                                reason,
                            },
                        }
                    }
                    Ok(Ok(_)) => continue,
                    Ok(Err(RecvError::Lagged(_))) | Err(_) => break,
                    Ok(Err(RecvError::Closed)) => {
                        feed = None;
                        break;
                    }
                }
            }
        }
    }
}

/// Storage handles the listener writes to.
#[derive(Clone)]
pub struct ListenerContext {
    pub journal: Arc<dyn Journal>,
    pub audit: AuditLog,
    /// Used with `ack_after = "mapped"`; default: [`JournalStateAck`].
    pub app_ack: Option<Arc<dyn ApplicationAck>>,
    /// Cap on unfinished-frame bytes shared with other listeners (`[mllp] max_buffered_bytes`).
    pub inbound_budget: Option<Arc<InboundBudget>>,
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub rate_limited: AtomicU64,
    pub timeouts: AtomicU64,
    /// Frames refused because the shared inbound buffer was full.
    pub busy: AtomicU64,
    /// Batches that held no message (acknowledged with `BTS|0`).
    pub empty_batches: AtomicU64,
}

struct Shared {
    cfg: MllpListenerConfig,
    tenant: String,
    partners: Partners,
    journal: Arc<dyn Journal>,
    audit: AuditLog,
    app_ack: Arc<dyn ApplicationAck>,
    app_acks: Arc<AppAcks>,
    inbound_budget: Option<Arc<InboundBudget>>,
    tls: Option<ReloadingAcceptor>,
    stats: Arc<ListenerStats>,
    /// Frames from senders that are not partners, kept as rejected: bounded so that anyone who
    /// can connect cannot fill the disk (see [`admit_unknown`]).
    unknown_frames: crate::partners::RateLimiter,
    shutdown: CancellationToken,
}

/// Frames per second (and burst) kept from senders that are not configured partners; beyond
/// that, such a frame gets no answer and the connection is closed (nothing was accepted, so a
/// real sender that was misconfigured retries later; an intruder only wastes its own time).
const UNKNOWN_FRAMES_PER_SEC: f64 = 5.0;
const UNKNOWN_FRAMES_BURST: u32 = 50;
/// Of a frame from an unknown sender, at most this much is kept.
const UNKNOWN_FRAME_KEPT: usize = 64 * 1024;

/// A bound MLLP listener, ready to [`run`](MllpListener::run).
pub struct MllpListener {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl MllpListener {
    /// Binds the address and loads TLS material. `default_tenant` applies unless the listener or
    /// a partner names another.
    pub async fn bind(
        cfg: MllpListenerConfig,
        default_tenant: &str,
        ctx: ListenerContext,
    ) -> Result<Self, MllpError> {
        // Many connections need many descriptors; raise the soft limit to the hard one.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let tls = match &cfg.tls {
            Some(t) => {
                Some(
                    ReloadingAcceptor::new(t.clone()).map_err(|source| MllpError::Tls {
                        listener: cfg.name.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|source| MllpError::Bind {
                addr: cfg.listen.clone(),
                source,
            })?;
        let tenant = cfg.tenant.clone().unwrap_or_else(|| default_tenant.into());
        let partners = Partners::new(&cfg, &tenant);
        let app_ack = ctx
            .app_ack
            .unwrap_or_else(|| Arc::new(JournalStateAck::new(ctx.journal.clone())));
        let shutdown = CancellationToken::new();
        let app_acks = Arc::new(AppAcks {
            listener: cfg.name.clone(),
            journal: ctx.journal.clone(),
            audit: ctx.audit.clone(),
            hook: app_ack.clone(),
            timeout: Duration::from_secs(cfg.app_ack_timeout_secs),
            resend_on_duplicate: cfg.resend_app_ack_on_duplicate,
            max_pending: cfg.max_pending_app_acks,
            limit: Arc::new(Semaphore::new(cfg.max_pending_app_acks)),
            pending: Default::default(),
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
            return_attempts: 5,
        });
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                cfg,
                tenant,
                partners,
                journal: ctx.journal,
                audit: ctx.audit,
                app_ack,
                app_acks,
                inbound_budget: ctx.inbound_budget,
                tls,
                stats: Arc::default(),
                unknown_frames: crate::partners::RateLimiter::new(
                    UNKNOWN_FRAMES_PER_SEC,
                    UNKNOWN_FRAMES_BURST,
                ),
                shutdown,
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> Arc<ListenerStats> {
        self.shared.stats.clone()
    }

    /// Forces a TLS reload now (tests, SIGHUP handlers).
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.shared.tls {
            Some(t) => t.reload(),
            None => Ok(()),
        }
    }

    /// Accepts connections until `shutdown` is cancelled, then lets connections finish the
    /// message in hand (up to 10 s).
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let name = shared.cfg.name.clone();
        let limit = Arc::new(Semaphore::new(shared.cfg.max_connections));
        let tracker = TaskTracker::new();
        let refusals = LogThrottle::new(REFUSAL_LOG_INTERVAL);
        if let Some(tls) = shared.tls.clone() {
            tracker.spawn(tls.keep_reloaded(name.clone(), shutdown.clone()));
        }
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                shared
                    .stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(not_logged) = refusals.hit() {
                    tracing::warn!(listener = %name, remote = %addr, max = shared.cfg.max_connections, refused_since_last_line = not_logged + 1, "connection limit reached; closing new connections (logged at most every 10 s, every one counted in /metrics)");
                }
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shared = shared.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                shared
                    .stats
                    .connections_open
                    .fetch_add(1, Ordering::Relaxed);
                shared
                    .stats
                    .connections_total
                    .fetch_add(1, Ordering::Relaxed);
                accept_connection(&shared, tcp, addr, stop).await;
                shared
                    .stats
                    .connections_open
                    .fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        shared.shutdown.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(listener = %name, "connections still open after 10 s; closing");
        }
        // application ACKs still waiting record why they were not sent, then end
        shared.app_acks.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), shared.app_acks.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(listener = %name, "application ACK tasks still running after 10 s");
        }
    }
}

async fn accept_connection(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    addr: SocketAddr,
    stop: CancellationToken,
) {
    let listener = shared.cfg.name.as_str();
    let mut identity = PeerIdentity {
        addr: Some(addr.ip()),
        cert_names: Vec::new(),
    };
    match &shared.tls {
        None => serve_connection(shared, tcp, addr, identity, stop).await,
        Some(tls) => {
            let acceptor = tls.acceptor();
            let handshake = tokio::time::timeout(
                Duration::from_secs(shared.cfg.read_timeout_secs),
                acceptor.accept(tcp),
            )
            .await;
            match handshake {
                Ok(Ok(stream)) => {
                    if let Some(cert) = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                    {
                        identity.cert_names = tributary_runtime::tls::cert_names(cert);
                    }
                    serve_connection(shared, stream, addr, identity, stop).await
                }
                Ok(Err(e)) => {
                    tracing::warn!(listener, remote = %addr, error = %e, "TLS handshake failed")
                }
                Err(_) => {
                    shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(listener, remote = %addr, "TLS handshake timed out")
                }
            }
        }
    }
}

/// What to do after a frame.
struct Reply {
    ack: Option<Vec<u8>>,
    close: bool,
}

async fn serve_connection<S>(
    shared: &Arc<Shared>,
    stream: S,
    addr: SocketAddr,
    identity: PeerIdentity,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &shared.cfg;
    let listener = cfg.name.as_str();
    let partner = shared.partners.identify(&identity);
    match &partner {
        Some(p) => {
            tracing::debug!(listener, remote = %addr, partner = %p.id, matched_by = p.matched_by, "connection opened")
        }
        None => {
            tracing::warn!(listener, remote = %addr, "unknown partner; refusing its messages");
            audit(shared, None, &addr, Outcome::UnknownPartner, None, None).await;
        }
    }
    let mut codec = MllpCodec::new(cfg.max_frame_bytes);
    if let Some(b) = &shared.inbound_budget {
        codec = codec.with_budget(b.clone());
    }
    let mut framed = Framed::with_capacity(stream, codec, 16 * 1024);
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let read = Duration::from_secs(cfg.read_timeout_secs);
    let write = Duration::from_secs(cfg.write_timeout_secs);
    let check = read.min(Duration::from_secs(1));
    let mut idle_deadline = Instant::now() + idle;
    // application ACKs for this connection's messages, written between frames
    let (app_tx, mut app_rx) = tokio::sync::mpsc::channel::<ConnWrite>(64);
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some((bytes, done)) = app_rx.recv() => {
                let ok = matches!(tokio::time::timeout(write, framed.send(bytes)).await, Ok(Ok(())));
                let _ = done.send(ok);
                if !ok {
                    tracing::info!(listener, remote = %addr, "application ACK write failed; closing (it goes to the return endpoint or is recorded)");
                    break;
                }
                continue;
            }
            f = framed.next() => f,
            _ = tokio::time::sleep(check) => {
                let now = Instant::now();
                let slow = framed.codec().frame_started().is_some_and(|t| now >= t + read);
                if slow || (framed.codec().frame_started().is_none() && now >= idle_deadline) {
                    shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    let kind = if slow { "read timeout (message incomplete)" } else { "idle timeout" };
                    tracing::info!(listener, remote = %addr, timeout = kind, "closing connection");
                    break;
                }
                continue;
            }
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(listener, remote = %addr, error = %e, "connection read failed");
                break;
            }
            Some(Ok(f)) => f,
        };
        let reply = match frame {
            MllpFrame::Message(payload) => {
                handle_payload(shared, partner.as_ref(), &addr, payload, &app_tx).await
            }
            MllpFrame::Oversized { head, limit } => {
                handle_oversized(shared, partner.as_ref(), &addr, head, limit).await
            }
            MllpFrame::Overloaded { head, cap } => {
                handle_busy(shared, partner.as_ref(), &addr, head, cap).await
            }
        };
        if let Some(ack) = reply.ack {
            match tokio::time::timeout(write, framed.send(ack)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(listener, remote = %addr, error = %e, "ACK write failed");
                    break;
                }
                Err(_) => {
                    shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(listener, remote = %addr, "client does not read its ACKs; closing (messages are journaled)");
                    break;
                }
            }
        }
        if reply.close {
            break;
        }
        idle_deadline = Instant::now() + idle;
    }
    let junk = framed.codec().junk_bytes();
    if junk > 0 {
        tracing::info!(listener, remote = %addr, junk_bytes = junk, abandoned_frames = framed.codec().abandoned_frames(), "bytes outside MLLP frames were discarded");
    }
    tracing::debug!(listener, remote = %addr, "connection closed");
}

async fn audit(
    shared: &Shared,
    partner: Option<&Partner>,
    addr: &SocketAddr,
    outcome: Outcome,
    id: Option<MessageId>,
    message_type: Option<&str>,
) {
    let body = audit_body(shared, partner, addr, outcome, id, message_type);
    if let Err(e) = shared.audit.append(vec![body]).await {
        tracing::error!(listener = %shared.cfg.name, error = %e, "audit write failed");
    }
}

fn audit_body(
    shared: &Shared,
    partner: Option<&Partner>,
    addr: &SocketAddr,
    outcome: Outcome,
    id: Option<MessageId>,
    message_type: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "ingress",
        "protocol": "hl7v2-mllp",
        "at": tributary_core::format_rfc3339_millis(tributary_core::now_millis()),
        "listener": shared.cfg.name,
        "tenant": partner.map_or(shared.tenant.as_str(), |p| p.tenant.as_str()),
        "partner": partner.map(|p| p.id.as_str()),
        "remote_addr": addr.ip().to_string(),
        "outcome": outcome.as_str(),
        "message_id": id.map(|i| i.to_string()),
        "message_type": message_type,
    })
}

fn enhanced(h: Option<&Header<'_>>) -> bool {
    h.is_some_and(|h| h.enhanced_mode())
}

fn reply_for(
    shared: &Shared,
    h: Option<&Header<'_>>,
    outcome: Outcome,
    err: Option<&AckError>,
) -> Option<Vec<u8>> {
    let code = outcome.code(enhanced(h));
    (!shared.cfg.follow_msh15 || ack::should_send(h, code)).then(|| ack::build_ack(h, code, err))
}

fn message_type_of(h: &Header<'_>) -> String {
    let mut t = ascii_lossy(h.message_code(), 8);
    if !h.trigger_event().is_empty() {
        t.push('^');
        t.push_str(&ascii_lossy(h.trigger_event(), 8));
    }
    t
}

async fn handle_payload(
    shared: &Arc<Shared>,
    partner: Option<&Partner>,
    addr: &SocketAddr,
    payload: Bytes,
    conn: &ConnTx,
) -> Reply {
    let Some(partner) = partner else {
        return refuse_unknown(shared, addr, payload).await;
    };
    if header::is_batch(&payload) {
        return handle_batch(shared, partner, addr, payload, conn).await;
    }
    let (ack, _) = handle_message(shared, partner, addr, payload, None, None, conn).await;
    Reply { ack, close: false }
}

/// Whether a frame from a sender that is no partner may be kept; when not, it is counted and
/// the connection closed without an answer.
fn admit_unknown(shared: &Shared, addr: &SocketAddr) -> bool {
    if shared.unknown_frames.try_acquire() {
        return true;
    }
    shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(listener = %shared.cfg.name, remote = %addr, "frame from an unknown sender dropped: over the unknown-sender budget");
    false
}

async fn refuse_unknown(shared: &Arc<Shared>, addr: &SocketAddr, payload: Bytes) -> Reply {
    if !admit_unknown(shared, addr) {
        return Reply {
            ack: None,
            close: true,
        };
    }
    let h = Header::read(&payload).ok();
    let mut reason = format!("unknown partner on listener {}", shared.cfg.name);
    let kept = if payload.len() > UNKNOWN_FRAME_KEPT {
        reason.push_str(&format!(
            "; first {UNKNOWN_FRAME_KEPT} of {} bytes kept",
            payload.len()
        ));
        payload.slice(..UNKNOWN_FRAME_KEPT)
    } else {
        payload.clone()
    };
    let (outcome, header) = (Outcome::UnknownPartner, h.as_ref());
    let Some(id) = journal_refused(shared, None, addr, kept, header, outcome, reason).await else {
        return not_stored(shared, header, true);
    };
    tracing::warn!(listener = %shared.cfg.name, remote = %addr, message_id = %id, "message from unknown partner refused");
    let err = AckError::new(
        ("207", "Application internal error"),
        "unknown partner: this sender is not configured on this listener",
    );
    Reply {
        ack: Some(ack::build_ack(
            h.as_ref(),
            Outcome::UnknownPartner.code(enhanced(h.as_ref())),
            Some(&err),
        )),
        close: true,
    }
}

async fn handle_oversized(
    shared: &Arc<Shared>,
    partner: Option<&Partner>,
    addr: &SocketAddr,
    head: Bytes,
    limit: usize,
) -> Reply {
    if partner.is_none() && !admit_unknown(shared, addr) {
        return Reply {
            ack: None,
            close: true,
        };
    }
    let h = Header::read(&head).ok();
    let reason = format!(
        "frame exceeds max_frame_bytes ({limit} bytes); first {} bytes kept",
        head.len()
    );
    let (outcome, header) = (Outcome::Oversized, h.as_ref());
    let Some(id) =
        journal_refused(shared, partner, addr, head.clone(), header, outcome, reason).await
    else {
        return not_stored(shared, header, partner.is_none());
    };
    tracing::warn!(listener = %shared.cfg.name, remote = %addr, message_id = %id, limit, "oversized frame rejected");
    let err = AckError::new(
        ("207", "Application internal error"),
        format!("frame exceeds {limit} bytes"),
    );
    Reply {
        ack: reply_for(shared, h.as_ref(), Outcome::Oversized, Some(&err)),
        close: partner.is_none(),
    }
}

/// The shared inbound buffer is full: "busy, retry". Nothing was accepted, so nothing is stored;
/// the sender keeps the message and resends it. The rest of the refused frame is discarded as it
/// arrives (never buffered), and the connection stays usable.
async fn handle_busy(
    shared: &Arc<Shared>,
    partner: Option<&Partner>,
    addr: &SocketAddr,
    head: Bytes,
    cap: usize,
) -> Reply {
    let h = Header::read(&head).ok();
    shared.stats.busy.fetch_add(1, Ordering::Relaxed);
    let mt = h.as_ref().map(message_type_of);
    audit(shared, partner, addr, Outcome::Busy, None, mt.as_deref()).await;
    tracing::warn!(listener = %shared.cfg.name, remote = %addr, max_buffered_bytes = cap, "inbound buffer limit reached; message refused with retry");
    let err = AckError::new(
        ("207", "Application internal error"),
        "inbound buffer limit reached, retry",
    );
    Reply {
        ack: h
            .as_ref()
            .map(|h| ack::build_ack(Some(h), Outcome::Busy.code(h.enhanced_mode()), Some(&err))),
        close: h.is_none(),
    }
}

/// The keys of a message as every HL7 v2 ingress computes them (one implementation, shared with
/// the pipeline's split of a replayed batch).
pub use tributary_hl7v2::ingress::{dedup_key, ordering_key};

/// Why a message cannot be accepted: its header lacks what an ACK needs, or it does not parse.
#[derive(Debug)]
enum Rejection {
    Header(header::HeaderError),
    Parse(tributary_hl7v2::ParseError),
}

impl From<header::HeaderError> for Rejection {
    fn from(e: header::HeaderError) -> Self {
        Rejection::Header(e)
    }
}

impl From<tributary_hl7v2::ParseError> for Rejection {
    fn from(e: tributary_hl7v2::ParseError) -> Self {
        Rejection::Parse(e)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Header(e) => e.fmt(f),
            Rejection::Parse(e) => e.fmt(f),
        }
    }
}

impl Rejection {
    fn hl7_code(&self) -> (&'static str, &'static str) {
        use tributary_hl7v2::ParseErrorKind as K;
        match self {
            Rejection::Header(e) => e.hl7_code(),
            Rejection::Parse(p) => match p.kind {
                K::Empty | K::MissingMsh { .. } | K::BadSegmentName => {
                    ("100", "Segment sequence error")
                }
                K::TooManySegments => ("207", "Application internal error"),
                K::BadDelimiters(_) | K::InvalidEncoding { .. } => ("102", "Data type error"),
                K::UnsupportedCharset(_) => ("103", "Table value not found"),
            },
        }
    }

    fn location(&self) -> Option<(&'static str, u32)> {
        use tributary_hl7v2::ParseErrorKind as K;
        match self {
            Rejection::Header(e) => e.location(),
            Rejection::Parse(p) => match p.kind {
                K::UnsupportedCharset(_) => Some(("MSH", 18)),
                K::BadDelimiters(_) => Some(("MSH", 2)),
                _ => None,
            },
        }
    }
}

/// Journals one message and builds its ACK. Returns the ACK (None when MSH-15 says not to send
/// one) and the outcome.
async fn handle_message(
    shared: &Arc<Shared>,
    partner: &Partner,
    addr: &SocketAddr,
    payload: Bytes,
    batch_id: Option<&str>,
    held: Option<&std::sync::atomic::AtomicBool>,
    conn: &ConnTx,
) -> (Option<Vec<u8>>, Outcome) {
    let cfg = &shared.cfg;
    let listener = cfg.name.as_str();
    let parsed = Header::read(&payload)
        .and_then(|h| h.require_ackable().map(|_| h))
        .map_err(Rejection::from)
        .and_then(|h| {
            // The full parse decides: charset per MSH-18, delimiters, segment structure.
            tributary_hl7v2::Message::parse(&payload)
                .map(|_| h)
                .map_err(Rejection::from)
        });
    let h = match parsed {
        Ok(h) => h,
        Err(e) => {
            let partial = Header::read(&payload).ok();
            let reason = format!("cannot acknowledge: {e}");
            let Some(id) = journal_refused(
                shared,
                Some(partner),
                addr,
                payload.clone(),
                partial.as_ref(),
                Outcome::Unparseable,
                reason,
            )
            .await
            else {
                let reply = not_stored(shared, partial.as_ref(), false);
                return (reply.ack, Outcome::StorageUnavailable);
            };
            tracing::warn!(listener, partner = %partner.id, message_id = %id, reason = %e, "message rejected");
            let mut err = AckError::new(e.hl7_code(), e.to_string());
            if let Some((seg, n)) = e.location() {
                err = err.at(seg, n);
            }
            return (
                reply_for(shared, partial.as_ref(), Outcome::Unparseable, Some(&err)),
                Outcome::Unparseable,
            );
        }
    };
    let mt = message_type_of(&h);
    // In a batch, once one message is refused "retry", every later one is too (`held`): the
    // bucket refills while earlier messages are stored, and a later message admitted now would
    // be journaled before the refused one the sender sends again — mapped out of order.
    if held.is_some_and(|h| h.load(Ordering::Acquire)) || !partner.admit() {
        if let Some(h) = held {
            h.store(true, Ordering::Release);
        }
        shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        audit(
            shared,
            Some(partner),
            addr,
            Outcome::RateLimited,
            None,
            Some(&mt),
        )
        .await;
        tracing::info!(listener, partner = %partner.id, message_type = %mt, "rate limited");
        let err = AckError::new(("207", "Application internal error"), "rate limited, retry");
        return (
            reply_for(shared, Some(&h), Outcome::RateLimited, Some(&err)),
            Outcome::RateLimited,
        );
    }
    let mut env = tributary_hl7v2::ingress::message_envelope(
        payload.clone(),
        &partner.tenant,
        &partner.id,
        &h,
    )
    .meta("listener", listener.to_string());
    if let Some(b) = batch_id {
        env = env.meta("batch_control_id", b.to_string());
    }
    let env = env.build();
    let new_id = env.id;
    let stored = if cfg.audit_accepted {
        let body = audit_body(
            shared,
            Some(partner),
            addr,
            Outcome::Accepted,
            Some(new_id),
            Some(&mt),
        );
        // The record is written beside the journal append, not after it (one fsync's wait, not
        // two), so it is written before the append's outcome is known. When that outcome is
        // not "accepted" — the journal failed, or holds the message already under another id —
        // a second record says so and names the first (`corrects`: its sequence number); the
        // chain cannot be edited.
        let (j, a) = tokio::join!(shared.journal.append(env), shared.audit.append(vec![body]));
        match &a {
            Err(e) => tracing::error!(listener, error = %e, "audit write failed"),
            Ok(seqs) => {
                let actual = match &j {
                    Err(_) => Some((Outcome::StorageUnavailable, new_id)),
                    Ok(r) if r.duplicate => Some((Outcome::Duplicate, r.id)),
                    Ok(_) => None,
                };
                if let (Some((outcome, id)), Some(seq)) = (actual, seqs.first()) {
                    let mut body =
                        audit_body(shared, Some(partner), addr, outcome, Some(id), Some(&mt));
                    body["corrects"] = serde_json::json!(seq);
                    if let Err(e) = shared.audit.append(vec![body]).await {
                        tracing::error!(listener, error = %e, "audit write failed");
                    }
                }
            }
        }
        j
    } else {
        shared.journal.append(env).await
    };
    let receipt = match stored {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(listener, partner = %partner.id, message_type = %mt, error = %e, "journal write failed; NAK sent");
            let err = AckError::new(
                ("207", "Application internal error"),
                "message could not be stored, retry",
            );
            return (
                reply_for(shared, Some(&h), Outcome::StorageUnavailable, Some(&err)),
                Outcome::StorageUnavailable,
            );
        }
    };
    let mut outcome = if receipt.duplicate {
        shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        tracing::info!(listener, partner = %partner.id, message_id = %receipt.id, message_type = %mt, "duplicate acknowledged again");
        Outcome::Duplicate
    } else {
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(listener, partner = %partner.id, message_id = %receipt.id, message_type = %mt, "message journaled");
        Outcome::Accepted
    };
    if let Some(kind) = AppAckType::of(&h) {
        if !receipt.duplicate || shared.app_acks.resend_for_duplicate(receipt.id) {
            let job = AppAckJob {
                id: receipt.id,
                partner: partner.clone(),
                msh: Bytes::copy_from_slice(&payload[h.msh.clone()]),
                kind,
                conn: Some(conn.clone()),
                remote: *addr,
            };
            shared.app_acks.start(job).await;
        } else {
            tracing::info!(listener, message_id = %receipt.id, "duplicate: application ACK already pending or sent; not sent again");
        }
    }
    let mut err = None;
    if cfg.ack_after == AckAfter::Mapped && !h.enhanced_mode() {
        match shared
            .app_ack
            .wait_processed(receipt.id, Duration::from_secs(cfg.mapped_timeout_secs))
            .await
        {
            ApplicationOutcome::Processed => {}
            ApplicationOutcome::Pending => {
                tracing::info!(listener, message_id = %receipt.id, "mapping still pending at ACK time; AA sent (message is stored)");
            }
            ApplicationOutcome::Failed { reason, field } => {
                outcome = Outcome::ApplicationError;
                let mut e = AckError::new(
                    ("207", "Application internal error"),
                    format!("mapping failed: {reason}"),
                );
                if let Some((seg, n)) = field
                    .as_deref()
                    .and_then(|f| f.split_once('-'))
                    .and_then(|(s, n)| Some((s.to_string(), n.parse::<u32>().ok()?)))
                {
                    e = e.at(&seg, n);
                }
                tracing::info!(listener, message_id = %receipt.id, "mapping failed; AE sent");
                err = Some(e);
            }
        }
    }
    (reply_for(shared, Some(&h), outcome, err.as_ref()), outcome)
}

async fn handle_batch(
    shared: &Arc<Shared>,
    partner: &Partner,
    addr: &SocketAddr,
    payload: Bytes,
    conn: &ConnTx,
) -> Reply {
    let batch = match header::split_batch(&payload) {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("batch cannot be split: {e}");
            let err = AckError::new(("100", "Segment sequence error"), format!("batch: {e}"));
            return refuse_batch(shared, partner, addr, payload, None, reason, err).await;
        }
    };
    // A trailer count that disagrees means messages were lost or run together on the way, or a
    // sender that miscounts: by default none of the batch is processed and the sender resends it
    // whole; a listener set to `accept` processes what arrived and says so in the batch ACK.
    let mismatches = batch.count_mismatches();
    let mut note = None;
    if !mismatches.is_empty() {
        let why = mismatches
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        match shared.cfg.batch_count_mismatch {
            BatchCountMismatch::Reject => {
                let reason = format!("batch count mismatch: {why}");
                let err = AckError::new(
                    ("100", "Segment sequence error"),
                    format!("batch rejected, no message of it accepted: {why}"),
                );
                return refuse_batch(shared, partner, addr, payload, Some(&batch), reason, err)
                    .await;
            }
            BatchCountMismatch::Accept => {
                tracing::warn!(
                    listener = %shared.cfg.name,
                    partner = %partner.id,
                    mismatch = %why,
                    "batch counts disagree; processing the messages received"
                );
                note = Some(format!(
                    "batch count mismatch, the messages received were processed: {why}"
                ));
            }
        }
    }
    // each message carries the control id of its own batch (BHS-11), else the file's (FHS-11)
    let batch_ids = tributary_hl7v2::ingress::batch_control_ids(&payload, &batch);
    if batch.messages.is_empty() {
        // HL7 allows an empty batch (periodic submission with nothing to send): nothing to
        // store, and the batch ACK says so (`BTS|0`).
        tracing::info!(
            listener = %shared.cfg.name,
            partner = %partner.id,
            batches = batch.batches.len(),
            messages = 0,
            "empty batch acknowledged"
        );
        shared.stats.empty_batches.fetch_add(1, Ordering::Relaxed);
        audit(shared, Some(partner), addr, Outcome::EmptyBatch, None, None).await;
        return Reply {
            ack: Some(ack::build_batch_ack(&payload, &batch, &[], None)),
            close: false,
        };
    }
    // Messages are started in batch order (`buffered` polls them in order, and the admission
    // check runs before a message's first wait), so `held` refuses exactly those after the first
    // rate-limited one.
    let held = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<(Option<Vec<u8>>, Outcome)> =
        futures::stream::iter(batch.messages.clone().into_iter().enumerate())
            .map(|(i, r)| {
                let msg = payload.slice(r);
                let batch_id = batch.batch_of(i).and_then(|b| batch_ids[b].clone());
                let held = &held;
                async move {
                    let id = batch_id.as_deref();
                    handle_message(shared, partner, addr, msg, id, Some(held), conn).await
                }
            })
            .buffered(64)
            .collect()
            .await;
    let acks: Vec<Vec<u8>> = results
        .iter()
        .enumerate()
        .map(|(i, (ack, outcome))| match ack {
            Some(a) => a.clone(),
            // MSH-15 said not to ACK this one individually; the batch ACK still reports it.
            None => {
                let h = Header::read(&payload[batch.messages[i].clone()]).ok();
                ack::build_ack(h.as_ref(), outcome.code(enhanced(h.as_ref())), None)
            }
        })
        .collect();
    tracing::info!(
        listener = %shared.cfg.name,
        partner = %partner.id,
        messages = acks.len(),
        accepted = results.iter().filter(|(_, o)| matches!(o, Outcome::Accepted | Outcome::Duplicate)).count(),
        "batch processed"
    );
    Reply {
        ack: Some(ack::build_batch_ack(
            &payload,
            &batch,
            &acks,
            note.as_deref(),
        )),
        close: false,
    }
}

/// Journals a refused frame whole as rejected with `reason` (kept for inspection and replay),
/// counts and audits it with `outcome`; returns its message id. A frame from an unknown sender
/// keeps the sender's address; an oversized one is marked truncated (only its head is kept).
/// `None` when it could not be stored: then the sender must not get a final AR/CR (it would
/// never resend), but [`not_stored`]'s "could not be stored, retry".
async fn journal_refused(
    shared: &Arc<Shared>,
    partner: Option<&Partner>,
    addr: &SocketAddr,
    payload: Bytes,
    header: Option<&Header<'_>>,
    outcome: Outcome,
    reason: String,
) -> Option<MessageId> {
    let mut env = Envelope::builder(Protocol::Hl7v2, payload)
        .tenant(partner.map_or_else(|| shared.tenant.clone(), |p| p.tenant.clone()))
        .partner(partner.map_or_else(|| "unknown".to_string(), |p| p.id.clone()))
        .meta("listener", shared.cfg.name.clone());
    if partner.is_none() {
        env = env.meta("remote_addr", addr.ip().to_string());
    }
    if outcome == Outcome::Oversized {
        env = env.meta("truncated", "true");
    }
    if let Some(h) = header {
        env = tributary_hl7v2::ingress::header_meta(env, h);
    }
    let env = env.build();
    let id = env.id;
    let mt = header.map(message_type_of);
    if let Err(se) = shared.journal.append_rejected(env, reason).await {
        tracing::error!(listener = %shared.cfg.name, error = %se, "journal write of a rejected message failed; the sender is asked to retry");
        let unavailable = Outcome::StorageUnavailable;
        audit(shared, partner, addr, unavailable, None, mt.as_deref()).await;
        return None;
    }
    shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
    audit(shared, partner, addr, outcome, Some(id), mt.as_deref()).await;
    Some(id)
}

/// The answer to a frame that could not be kept: "could not be stored, retry" (AE/CE), never
/// the final AR/CR its content would get; the connection is closed when `close`.
fn not_stored(shared: &Shared, h: Option<&Header<'_>>, close: bool) -> Reply {
    let err = AckError::new(
        ("207", "Application internal error"),
        "message could not be stored, retry",
    );
    Reply {
        ack: reply_for(shared, h, Outcome::StorageUnavailable, Some(&err)),
        close,
    }
}

/// A batch refused whole: it cannot be split (a segment other than FHS/BHS/MSH before the first
/// message), or its BTS-1/FTS-1 counts disagree with what arrived. The whole frame is journaled
/// as rejected with `reason`, so no segment is dropped silently, and answered `AR`/`CR`: a plain
/// ACK when it could not be split, a batch ACK rejecting every message otherwise.
async fn refuse_batch(
    shared: &Arc<Shared>,
    partner: &Partner,
    addr: &SocketAddr,
    payload: Bytes,
    batch: Option<&header::Batch>,
    reason: String,
    err: AckError,
) -> Reply {
    let listener = shared.cfg.name.as_str();
    // the first MSH, if any, for the ACK's header and MSA-2
    let first = match batch {
        Some(b) => b.messages.first().map(|r| r.start),
        None => header::segments(&payload)
            .find(|r| payload[r.clone()].starts_with(b"MSH"))
            .map(|r| r.start),
    };
    let h = first.and_then(|at| Header::read(&payload[at..]).ok());
    let Some(id) = journal_refused(
        shared,
        Some(partner),
        addr,
        payload.clone(),
        h.as_ref(),
        Outcome::Unparseable,
        reason.clone(),
    )
    .await
    else {
        return not_stored(shared, h.as_ref(), false);
    };
    tracing::warn!(listener, partner = %partner.id, message_id = %id, reason = %reason, "batch rejected");
    let ack = match batch {
        Some(b) => ack::build_batch_reject(&payload, b, &err),
        None => ack::build_ack(
            h.as_ref(),
            Outcome::Unparseable.code(enhanced(h.as_ref())),
            Some(&err),
        ),
    };
    Reply {
        ack: Some(ack),
        close: false,
    }
}

/// The registered [`Source`]: one MLLP listener inside `tributary serve`.
pub struct MllpSource {
    cfg: MllpListenerConfig,
    default_tenant: String,
    app_ack: Option<Arc<dyn ApplicationAck>>,
    feed: Option<ProcessedFeed>,
    budget: Option<Arc<InboundBudget>>,
}

impl MllpSource {
    pub fn new(cfg: MllpListenerConfig, default_tenant: impl Into<String>) -> Self {
        Self {
            cfg,
            default_tenant: default_tenant.into(),
            app_ack: None,
            feed: None,
            budget: None,
        }
    }

    /// Shares `[mllp] max_buffered_bytes` with the other listeners.
    pub fn with_inbound_budget(mut self, budget: Arc<InboundBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Learns mapping outcomes from the pipeline's feed (application ACKs, `ack_after =
    /// "mapped"`) instead of only polling the journal.
    pub fn with_processed_feed(mut self, feed: ProcessedFeed) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Lets the pipeline answer `ack_after = "mapped"` (default: watch the journal state).
    pub fn with_application_ack(mut self, hook: Arc<dyn ApplicationAck>) -> Self {
        self.app_ack = Some(hook);
        self
    }
}

#[async_trait]
impl Source for MllpSource {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()> {
        let name = self.cfg.name.clone();
        rt.readiness.set(&name, ComponentStatus::Starting);
        let ctx = ListenerContext {
            journal: rt.journal.clone(),
            audit: rt.audit.clone(),
            app_ack: self.app_ack.clone().or_else(|| {
                self.feed.clone().map(|f| {
                    Arc::new(JournalStateAck::new(rt.journal.clone()).with_feed(f))
                        as Arc<dyn ApplicationAck>
                })
            }),
            inbound_budget: self.budget.clone(),
        };
        let listener = match MllpListener::bind(self.cfg.clone(), &self.default_tenant, ctx).await {
            Ok(l) => l,
            Err(e) => {
                rt.readiness.set(
                    &name,
                    ComponentStatus::Failed {
                        reason: e.to_string(),
                    },
                );
                return Err(e.into());
            }
        };
        let addr = listener.local_addr()?;
        rt.metrics
            .provide(listener_samples(name.clone(), listener.stats()));
        tracing::info!(listener = %name, addr = %addr, tls = self.cfg.tls.is_some(), "mllp listening");
        rt.readiness.set(&name, ComponentStatus::Ready);
        listener.run(rt.shutdown.clone()).await;
        Ok(())
    }
}

/// The listener's own counters as `/metrics` samples.
fn listener_samples(
    listener: String,
    stats: Arc<ListenerStats>,
) -> tributary_runtime::metrics::Provider {
    use tributary_runtime::Sample;
    Box::new(move || {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let one = |name, value| Sample {
            name,
            labels: vec![("listener", listener.clone())],
            value,
        };
        let mut out = vec![
            one(
                "tributary_mllp_connections_open",
                v(&stats.connections_open),
            ),
            one(
                "tributary_mllp_connections_total",
                v(&stats.connections_total),
            ),
            one(
                "tributary_mllp_connections_refused_total",
                v(&stats.connections_refused),
            ),
            one("tributary_mllp_timeouts_total", v(&stats.timeouts)),
            one(
                "tributary_mllp_empty_batches_total",
                v(&stats.empty_batches),
            ),
        ];
        for (outcome, counter) in [
            ("accepted", &stats.accepted),
            ("duplicate", &stats.duplicates),
            ("rejected", &stats.rejected),
            ("rate_limited", &stats.rate_limited),
            ("busy", &stats.busy),
        ] {
            out.push(Sample {
                name: "tributary_mllp_messages_total",
                labels: vec![("listener", listener.clone()), ("outcome", outcome.into())],
                value: v(counter),
            });
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_is_found_in_mapping_errors() {
        assert_eq!(
            field_in("mappings/adt.map:12:3 rule patient: PID-3 is empty").as_deref(),
            Some("PID-3")
        );
        assert_eq!(field_in("OBX.5.1 bad").as_deref(), Some("OBX-5"));
        assert_eq!(field_in("no field here"), None);
    }
}
