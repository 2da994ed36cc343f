//! Enhanced-mode application acknowledgments (MSH-16 = `AL`, `ER`, `SU`).
//!
//! The commit ACK (`CA`/`CE`/`CR`, driven by MSH-15) is sent as soon as the message is durable;
//! the application ACK follows once the mapping pipeline committed it (`AA`) or failed it (`AE`
//! with an ERR segment naming the field and the reason; `AR` for messages the pipeline rejects).
//! One task per waiting message, bounded per listener, so the listener never waits for mapping.
//!
//! Delivery, in order: on the message's own connection while it is open (the ACK carries
//! MSH-15/16 = `NE`, so the sender answers nothing); else to the partner's `app_ack_return`
//! endpoint through the outbound MLLP client (MSH-15 = `AL`: the receiver's commit ACK confirms
//! it; retry with backoff); else it is recorded on the message (journal note `app_ack`) and
//! audited as undelivered. Every outcome, sent or not, is written to the note and audited.
//!
//! A duplicate (same partner, MSH-10 and content) does not trigger a second application ACK when
//! one is pending or was sent, unless the listener sets `resend_app_ack_on_duplicate`.

use crate::ack::{self, AckCode, AckError};
use crate::header::Header;
use crate::partners::Partner;
use crate::sink::{MllpSender, MllpSenderConfig};
use crate::source::{field_in, ApplicationAck, ApplicationOutcome};
use bytes::Bytes;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tributary_core::MessageId;
use tributary_storage::{AuditLog, Journal};

/// The journal note holding the application ACK's fate.
pub const NOTE: &str = "app_ack";

/// When MSH-16 asks for an application ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppAckType {
    /// `AL`: always.
    Always,
    /// `ER`: only when processing failed.
    OnError,
    /// `SU`: only when processing succeeded.
    OnSuccess,
}

impl AppAckType {
    /// MSH-16 of an enhanced-mode message; `NE`, empty, unknown values or original mode: none.
    /// (An empty MSH-16 beside a valued MSH-15 is treated as `NE`: those senders ask for the
    /// commit ACK only.)
    pub fn of(h: &Header<'_>) -> Option<Self> {
        if !h.enhanced_mode() {
            return None;
        }
        match h.application_ack_type() {
            b"AL" => Some(Self::Always),
            b"ER" => Some(Self::OnError),
            b"SU" => Some(Self::OnSuccess),
            _ => None,
        }
    }

    pub fn wants(&self, code: AckCode) -> bool {
        match self {
            Self::Always => true,
            Self::OnError => !code.is_positive(),
            Self::OnSuccess => code.is_positive(),
        }
    }

    fn as_str(&self) -> &'static str {
        match self {
            Self::Always => "AL",
            Self::OnError => "ER",
            Self::OnSuccess => "SU",
        }
    }
}

/// A frame for the connection task to write, and where to say whether it was written.
pub type ConnWrite = (Vec<u8>, oneshot::Sender<bool>);
/// The connection's write queue for application ACKs.
pub type ConnTx = mpsc::Sender<ConnWrite>;

/// One message waiting for its application ACK.
pub struct AppAckJob {
    pub id: MessageId,
    pub partner: Partner,
    /// The original MSH segment (only the header is kept while waiting, not the message).
    pub msh: Bytes,
    pub kind: AppAckType,
    pub conn: Option<ConnTx>,
    pub remote: SocketAddr,
}

/// The application-ACK machinery of one listener.
pub struct AppAcks {
    pub listener: String,
    pub journal: Arc<dyn Journal>,
    pub audit: AuditLog,
    pub hook: Arc<dyn ApplicationAck>,
    pub timeout: Duration,
    pub resend_on_duplicate: bool,
    pub max_pending: usize,
    pub limit: Arc<Semaphore>,
    pub pending: Mutex<HashSet<MessageId>>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Outbound client settings for return endpoints (attempts, backoff, timeouts).
    pub return_attempts: u32,
}

impl AppAcks {
    /// Whether a duplicate of `id` should trigger its application ACK again.
    pub fn resend_for_duplicate(&self, id: MessageId) -> bool {
        if self.pending.lock().is_ok_and(|p| p.contains(&id)) {
            return false;
        }
        if self.resend_on_duplicate {
            return true;
        }
        // sent before: not again. Never delivered (or never tried): try now.
        !self
            .journal
            .notes(id)
            .ok()
            .and_then(|n| n.get(NOTE).cloned())
            .is_some_and(|n| n.starts_with("sent"))
    }

    /// Starts waiting for `job`'s message; never blocks the connection.
    pub async fn start(self: &Arc<Self>, job: AppAckJob) {
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            let text = format!(
                "not sent: more than {} messages waiting for application ACKs on this listener",
                self.max_pending
            );
            self.record(&job, None, "app_ack_not_sent", text).await;
            return;
        };
        if let Ok(mut p) = self.pending.lock() {
            if !p.insert(job.id) {
                return; // already waiting
            }
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            this.deliver(&job).await;
            if let Ok(mut p) = this.pending.lock() {
                p.remove(&job.id);
            }
            drop(permit);
        });
    }

    async fn deliver(&self, job: &AppAckJob) {
        let outcome = tokio::select! {
            o = self.hook.wait_processed(job.id, self.timeout) => o,
            _ = self.shutdown.cancelled() => {
                let text = "not sent: the listener stopped before the message was processed".to_string();
                self.record(job, None, "app_ack_not_sent", text).await;
                return;
            }
        };
        let (code, err) = match outcome {
            ApplicationOutcome::Processed => (AckCode::AA, None),
            ApplicationOutcome::Failed { reason, field } => {
                let code = if reason.starts_with("rejected") {
                    AckCode::AR
                } else {
                    AckCode::AE
                };
                let mut e = AckError::new(
                    ("207", "Application internal error"),
                    format!("mapping failed: {reason}"),
                );
                let loc = field.or_else(|| field_in(&reason)).and_then(|f| {
                    let (s, n) = f.split_once('-')?;
                    Some((s.to_string(), n.parse::<u32>().ok()?))
                });
                if let Some((seg, n)) = loc {
                    e = e.at(&seg, n);
                }
                (code, Some(e))
            }
            ApplicationOutcome::Pending => {
                let text = format!(
                    "not sent: not processed within {} s (the message is stored and will be processed)",
                    self.timeout.as_secs()
                );
                self.record(job, None, "app_ack_not_sent", text).await;
                return;
            }
        };
        if !job.kind.wants(code) {
            tracing::debug!(listener = %self.listener, message_id = %job.id, code = code.as_str(), msh16 = job.kind.as_str(), "no application ACK asked for this outcome");
            return;
        }
        let Ok(h) = Header::read(&job.msh) else {
            return; // cannot happen: the header was read before the message was accepted
        };
        if let Some(tx) = &job.conn {
            let bytes = ack::build_application_ack(&h, code, err.as_ref(), b"NE");
            let (done, written) = oneshot::channel();
            if tx.send((bytes, done)).await.is_ok() && written.await == Ok(true) {
                let text = format!("sent {} on the message's connection", code.as_str());
                self.record(job, Some(code), "app_ack_sent", text).await;
                return;
            }
        }
        let Some((addr, tls)) = &job.partner.app_ack_return else {
            let text = format!(
                "undelivered {}: the connection closed and partner {} has no app_ack_return",
                code.as_str(),
                job.partner.id
            );
            self.record(job, Some(code), "app_ack_undelivered", text)
                .await;
            return;
        };
        let mut cfg = MllpSenderConfig::new(addr.clone());
        cfg.max_attempts = self.return_attempts;
        cfg.backoff_initial = Duration::from_millis(500);
        cfg.backoff_max = Duration::from_secs(30);
        if let Some(t) = tls {
            match t.load(addr) {
                Ok(c) => cfg.tls = Some(c),
                Err(e) => {
                    let text = format!(
                        "undelivered {}: return endpoint {addr}: TLS setup failed: {e}",
                        code.as_str()
                    );
                    self.record(job, Some(code), "app_ack_undelivered", text)
                        .await;
                    return;
                }
            }
        }
        let bytes = ack::build_application_ack(&h, code, err.as_ref(), b"AL");
        let mut sender = MllpSender::new(cfg);
        let sent = tokio::select! {
            r = sender.send(&bytes) => r,
            _ = self.shutdown.cancelled() => {
                let text = format!("undelivered {}: the listener stopped while sending to {addr}", code.as_str());
                self.record(job, Some(code), "app_ack_undelivered", text).await;
                return;
            }
        };
        match sent {
            Ok(a) => {
                let text = format!(
                    "sent {} to return endpoint {addr}; it answered {}",
                    code.as_str(),
                    a.code.as_str()
                );
                self.record(job, Some(code), "app_ack_sent", text).await;
            }
            Err(e) => {
                let text = format!("undelivered {}: return endpoint {addr}: {e}", code.as_str());
                self.record(job, Some(code), "app_ack_undelivered", text)
                    .await;
            }
        }
    }

    /// Writes the note, the audit record and the log line for one application ACK outcome.
    async fn record(&self, job: &AppAckJob, code: Option<AckCode>, outcome: &str, text: String) {
        let listener = self.listener.as_str();
        if outcome == "app_ack_sent" {
            tracing::info!(listener, partner = %job.partner.id, message_id = %job.id, outcome, "{text}");
        } else {
            tracing::warn!(listener, partner = %job.partner.id, message_id = %job.id, outcome, "{text}");
        }
        let at = tributary_core::format_rfc3339_millis(tributary_core::now_millis());
        if let Err(e) = self
            .journal
            .set_note(job.id, NOTE, format!("{text} ({at})"))
            .await
        {
            tracing::error!(listener, message_id = %job.id, error = %e, "could not record the application ACK outcome");
        }
        let body = serde_json::json!({
            "kind": "ingress",
            "protocol": "hl7v2-mllp",
            "at": at,
            "listener": listener,
            "tenant": job.partner.tenant,
            "partner": job.partner.id,
            "remote_addr": job.remote.ip().to_string(),
            "outcome": outcome,
            "ack_code": code.map(|c| c.as_str()),
            "message_id": job.id.to_string(),
        });
        if let Err(e) = self.audit.append(vec![body]).await {
            tracing::error!(listener, error = %e, "audit write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msh16_decides() {
        let h = |m: &'static [u8]| Header::read(m).unwrap();
        let al = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||AL|AL\r";
        let er = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||AL|ER\r";
        let su = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||NE|SU\r";
        let ne = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||AL|NE\r";
        let empty = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||AL\r";
        let original = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5\r";
        assert_eq!(AppAckType::of(&h(al)), Some(AppAckType::Always));
        assert_eq!(AppAckType::of(&h(er)), Some(AppAckType::OnError));
        assert_eq!(AppAckType::of(&h(su)), Some(AppAckType::OnSuccess));
        assert_eq!(AppAckType::of(&h(ne)), None);
        assert_eq!(AppAckType::of(&h(empty)), None);
        assert_eq!(AppAckType::of(&h(original)), None);
        assert!(AppAckType::OnError.wants(AckCode::AE));
        assert!(!AppAckType::OnError.wants(AckCode::AA));
        assert!(AppAckType::OnSuccess.wants(AckCode::AA));
        assert!(!AppAckType::OnSuccess.wants(AckCode::AR));
    }
}
