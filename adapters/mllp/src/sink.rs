//! The outbound MLLP client: sends HL7 v2 messages to a downstream MLLP endpoint over one
//! persistent connection (plain or TLS), waits for each ACK, and retries with exponential
//! backoff when the connection fails or the receiver asks for a retry.
//!
//! Delivery is at-least-once: after a lost connection the message is sent again, so receivers
//! should de-duplicate by MSH-10 (Tributary's own listener does).

use crate::ack::{read_msa, AckCode};
use crate::codec::{MllpCodec, MllpFrame};
use futures::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// Frames for other messages skipped while waiting for an ACK before the connection is given
/// up as confused (a fresh one is opened for the retry).
const MAX_UNRELATED_FRAMES: usize = 16;

/// Where and how to send.
#[derive(Clone)]
pub struct MllpSenderConfig {
    /// `host:port` of the receiver.
    pub addr: String,
    /// TLS client configuration and the server name to verify; `None` for plain TCP.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
    pub connect_timeout: Duration,
    /// How long to wait for the ACK of one message.
    pub ack_timeout: Duration,
    /// Attempts per message (1 = no retry).
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_frame_bytes: usize,
}

impl MllpSenderConfig {
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            tls: None,
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            max_attempts: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_frame_bytes: crate::codec::DEFAULT_MAX_FRAME,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to {addr} failed: {reason}")]
    Io { addr: String, reason: String },
    #[error("no ACK from {addr} within {0:?}", .timeout)]
    AckTimeout { addr: String, timeout: Duration },
    #[error("receiver answered with something that is not an HL7 ACK")]
    BadAck,
    #[error("receiver refused the message: MSA-1 {code:?}")]
    Negative { code: AckCode, ack: Vec<u8> },
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: Box<SendError> },
}

/// A received acknowledgment.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub code: AckCode,
    /// MSA-2 as received.
    pub control_id: Vec<u8>,
    /// The whole ACK message.
    pub ack: Vec<u8>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One persistent MLLP connection with retry.
pub struct MllpSender {
    cfg: MllpSenderConfig,
    conn: Option<Framed<Box<dyn Io>, MllpCodec>>,
}

impl MllpSender {
    pub fn new(cfg: MllpSenderConfig) -> Self {
        Self { cfg, conn: None }
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    async fn connect(&mut self) -> Result<(), SendError> {
        let addr = self.cfg.addr.clone();
        let err = |reason: String| SendError::Connect {
            addr: addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.cfg.tls {
            None => Box::new(tcp),
            Some((config, name)) => {
                let name = ServerName::try_from(name.clone()).map_err(|e| err(e.to_string()))?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls =
                    tokio::time::timeout(self.cfg.connect_timeout, connector.connect(name, tcp))
                        .await
                        .map_err(|_| err("TLS handshake timed out".into()))?
                        .map_err(|e| err(format!("TLS: {e}")))?;
                Box::new(tls)
            }
        };
        self.conn = Some(Framed::new(io, MllpCodec::new(self.cfg.max_frame_bytes)));
        Ok(())
    }

    /// Sends once over the current (or a new) connection and waits for the reply frame that
    /// acknowledges it (see [`MAX_UNRELATED_FRAMES`]).
    pub async fn send_once(&mut self, payload: &[u8]) -> Result<Vec<u8>, SendError> {
        if self.conn.is_none() {
            self.connect().await?;
        }
        let addr = self.cfg.addr.clone();
        let timeout = self.cfg.ack_timeout;
        let conn = self.conn.as_mut().ok_or(SendError::BadAck)?;
        let io_err = |reason: String| SendError::Io {
            addr: addr.clone(),
            reason,
        };
        // The ACK is the frame whose MSA-2 names this message's MSH-10. A receiver may send
        // other frames on the connection (application ACKs of earlier messages in enhanced
        // mode): taking the first frame would shift every later ACK onto the wrong message.
        // (A batch — FHS/BHS first — is answered by one batch ACK: the first frame.)
        let control_id = payload
            .starts_with(b"MSH")
            .then(|| crate::header::Header::read(payload).ok())
            .flatten()
            .map(|h| h.control_id().to_vec())
            .filter(|c| !c.is_empty());
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || SendError::AckTimeout {
            addr: addr.clone(),
            timeout,
        };
        let result = async {
            // A receiver that stops reading must not hold the route: the write has the same bound.
            tokio::time::timeout_at(deadline, conn.send(payload))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| io_err(e.to_string()))?;
            for _ in 0..MAX_UNRELATED_FRAMES {
                let ack = match tokio::time::timeout_at(deadline, conn.next()).await {
                    Err(_) => return Err(timed_out()),
                    Ok(None) => return Err(io_err("connection closed before the ACK".into())),
                    Ok(Some(Err(e))) => return Err(io_err(e.to_string())),
                    Ok(Some(Ok(MllpFrame::Message(ack)))) => ack.to_vec(),
                    Ok(Some(Ok(MllpFrame::Oversized { .. } | MllpFrame::Overloaded { .. }))) => {
                        return Err(SendError::BadAck)
                    }
                };
                let matches = match (&control_id, read_msa(&ack)) {
                    (Some(ours), Some((_, acked))) => acked == *ours,
                    _ => true,
                };
                if matches {
                    return Ok(ack);
                }
                tracing::debug!(addr = %addr, "MLLP frame for another message skipped while waiting for an ACK");
            }
            Err(SendError::BadAck)
        }
        .await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Sends a message and waits for a positive ACK, retrying with backoff on connection
    /// failures, timeouts and negative ACKs whose text asks for a retry (rate limits, storage).
    pub async fn send(&mut self, payload: &[u8]) -> Result<Acknowledged, SendError> {
        let mut delay = self.cfg.backoff_initial;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.send_once(payload).await {
                Ok(ack) => match read_msa(&ack) {
                    Some((code, control_id)) if code.is_positive() => {
                        return Ok(Acknowledged {
                            code,
                            control_id,
                            ack,
                        })
                    }
                    Some((code, _)) => {
                        let retryable = matches!(code, AckCode::AR | AckCode::CE)
                            && String::from_utf8_lossy(&ack)
                                .to_ascii_lowercase()
                                .contains("retry");
                        let e = SendError::Negative { code, ack };
                        if !retryable {
                            return Err(e);
                        }
                        e
                    }
                    None => return Err(SendError::BadAck),
                },
                Err(e) => e,
            };
            if attempt >= self.cfg.max_attempts {
                return Err(SendError::GaveUp {
                    attempts: attempt,
                    last: Box::new(err),
                });
            }
            tracing::debug!(addr = %self.cfg.addr, attempt, error = %err, "MLLP send failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.cfg.backoff_max);
        }
    }
}
