//! MLLP framing: `0x0B <payload> 0x1C 0x0D`, as a `tokio_util` codec.
//!
//! The decoder is tolerant where real senders are sloppy and strict where hostile input could
//! cost memory:
//! - bytes between frames (stray CR/LF, keep-alive garbage) are discarded and counted;
//! - the end block is `0x1C`, with the trailing `0x0D` consumed when present;
//! - a new start block inside an unfinished frame abandons the broken frame and starts over;
//! - a frame larger than `max_frame` is never buffered: the decoder yields
//!   [`MllpFrame::Oversized`] with the first bytes (enough to read MSH-10 for the NAK), then
//!   discards the rest of that frame as it streams in.
//!
//! - with an [`InboundBudget`] shared by every connection, the bytes of unfinished frames across
//!   all connections stay under one cap: a frame that would exceed it yields
//!   [`MllpFrame::Overloaded`] (the listener answers "busy, retry"), the rest of it is discarded.
//!
//! The payload is handed on exactly as received (BOM, CR/LF/CRLF separators and all), so the
//! journal keeps the sender's bytes; header reading copes with those variations.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::codec::{Decoder, Encoder};

pub const START_BLOCK: u8 = 0x0B;
pub const END_BLOCK: u8 = 0x1C;
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Default largest frame: 10 MiB.
pub const DEFAULT_MAX_FRAME: usize = 10 << 20;

/// How many leading bytes of an oversized frame are kept for the rejection (MSH is in there).
pub const OVERSIZED_HEAD: usize = 4096;

/// One decoded unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MllpFrame {
    /// A complete payload between the start and end blocks.
    Message(Bytes),
    /// A frame that exceeded the limit; `head` holds its first bytes, the rest is discarded.
    Oversized { head: Bytes, limit: usize },
    /// Buffering the rest of this frame would exceed the shared [`InboundBudget`]; `head`
    /// holds its first bytes, the rest is discarded.
    Overloaded { head: Bytes, cap: usize },
}

/// A cap on the bytes of unfinished frames buffered across every connection that shares it
/// (`[mllp] max_buffered_bytes`). Complete frames leave the budget when they are decoded.
#[derive(Debug)]
pub struct InboundBudget {
    used: AtomicUsize,
    cap: usize,
}

impl InboundBudget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            cap,
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes currently held by unfinished frames.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.cap)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for a start block; everything else is junk.
    Seeking,
    /// Inside a frame whose start block is at `buf[0]`; `scanned` bytes were already searched.
    InFrame { scanned: usize },
    /// Discarding the remainder of an oversized frame up to its end block.
    Skipping,
}

/// The MLLP codec. Encoding wraps a payload in the frame; decoding is described in the module docs.
#[derive(Debug)]
pub struct MllpCodec {
    max_frame: usize,
    state: State,
    frame_started: Option<Instant>,
    junk_bytes: u64,
    abandoned_frames: u64,
    budget: Option<Arc<InboundBudget>>,
    /// Bytes this codec holds of the budget.
    held: usize,
}

impl Drop for MllpCodec {
    fn drop(&mut self) {
        self.release();
    }
}

impl Default for MllpCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl MllpCodec {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame.max(16),
            state: State::Seeking,
            frame_started: None,
            junk_bytes: 0,
            abandoned_frames: 0,
            budget: None,
            held: 0,
        }
    }

    /// Counts this connection's unfinished frame against a budget shared with others.
    pub fn with_budget(mut self, budget: Arc<InboundBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    fn release(&mut self) {
        if self.held == 0 {
            return;
        }
        if let Some(b) = &self.budget {
            b.give_back(self.held);
        }
        self.held = 0;
    }

    /// Holds `buffered` bytes of the budget; false when the budget cannot cover them.
    fn hold(&mut self, buffered: usize) -> bool {
        let Some(b) = &self.budget else { return true };
        if buffered <= self.held {
            b.give_back(self.held - buffered);
            self.held = buffered;
            return true;
        }
        if b.try_take(buffered - self.held) {
            self.held = buffered;
            true
        } else {
            false
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// When the start block of the frame being read arrived; `None` between frames.
    pub fn frame_started(&self) -> Option<Instant> {
        self.frame_started
    }

    /// Bytes discarded outside frames so far (for logs and tests).
    pub fn junk_bytes(&self) -> u64 {
        self.junk_bytes
    }

    /// Unfinished frames abandoned because a new start block arrived.
    pub fn abandoned_frames(&self) -> u64 {
        self.abandoned_frames
    }

    fn seek(&mut self, src: &mut BytesMut) -> bool {
        match memchr::memchr(START_BLOCK, src) {
            Some(pos) => {
                self.junk_bytes += pos as u64;
                src.advance(pos);
                self.state = State::InFrame { scanned: 1 };
                self.frame_started = Some(Instant::now());
                true
            }
            None => {
                self.junk_bytes += src.len() as u64;
                src.clear();
                false
            }
        }
    }
}

impl Decoder for MllpCodec {
    type Item = MllpFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<MllpFrame>, CodecError> {
        let out = self.decode_frame(src);
        // Only an unfinished frame holds budget; a decoded frame has left the buffer.
        if !matches!(self.state, State::InFrame { .. }) {
            self.release();
        }
        out
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<MllpFrame>, CodecError> {
        // An unfinished frame at EOF is not a message: the sender got no ACK and must resend.
        let out = self.decode(src)?;
        if out.is_none() {
            src.clear();
            self.release();
        }
        Ok(out)
    }
}

impl MllpCodec {
    fn decode_frame(&mut self, src: &mut BytesMut) -> Result<Option<MllpFrame>, CodecError> {
        loop {
            match self.state {
                State::Seeking => {
                    if !self.seek(src) {
                        return Ok(None);
                    }
                }
                State::Skipping => match memchr::memchr(END_BLOCK, src) {
                    Some(pos) => {
                        src.advance(pos + 1);
                        self.state = State::Seeking;
                        self.frame_started = None;
                    }
                    None => {
                        src.clear();
                        return Ok(None);
                    }
                },
                State::InFrame { scanned } => {
                    // Search only the new bytes, and never past the limit (+1 for the end block).
                    let limit = (self.max_frame + 2).min(src.len());
                    let window = &src[scanned..limit];
                    match memchr::memchr2(END_BLOCK, START_BLOCK, window) {
                        Some(rel) if window[rel] == START_BLOCK => {
                            // A new frame begins before the old one ended: the sender gave up on
                            // it. Drop the fragment and start over at the new start block. The read
                            // timeout keeps counting from the abandoned frame's start: a sender that
                            // sent start blocks forever would otherwise never time out.
                            self.abandoned_frames += 1;
                            self.junk_bytes += (scanned + rel) as u64;
                            src.advance(scanned + rel);
                            self.state = State::InFrame { scanned: 1 };
                        }
                        Some(rel) => {
                            let end = scanned + rel;
                            let mut frame = src.split_to(end + 1);
                            frame.truncate(end);
                            frame.advance(1);
                            if src.first() == Some(&CARRIAGE_RETURN) {
                                src.advance(1);
                            }
                            self.state = State::Seeking;
                            self.frame_started = None;
                            return Ok(Some(MllpFrame::Message(frame.freeze())));
                        }
                        None => {
                            // payload length so far = limit - 1 (minus the start block)
                            if limit.saturating_sub(1) > self.max_frame {
                                // Only bytes known to belong to this frame (searched, no end block):
                                // never the start of the next frame.
                                let head_len = OVERSIZED_HEAD.min(limit - 1);
                                let head = Bytes::copy_from_slice(&src[1..1 + head_len]);
                                // Everything up to `limit` was searched: no end block there.
                                src.advance(limit);
                                self.state = State::Skipping;
                                return Ok(Some(MllpFrame::Oversized {
                                    head,
                                    limit: self.max_frame,
                                }));
                            }
                            if !self.hold(limit) {
                                let cap = self.budget.as_ref().map_or(0, |b| b.cap());
                                let head_len = OVERSIZED_HEAD.min(limit - 1);
                                let head = Bytes::copy_from_slice(&src[1..1 + head_len]);
                                src.advance(limit);
                                self.state = State::Skipping;
                                return Ok(Some(MllpFrame::Overloaded { head, cap }));
                            }
                            self.state = State::InFrame { scanned: limit };
                            // Reserve moderately; the limit bounds growth, not this hint.
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for MllpCodec {
    type Error = CodecError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let payload = item.as_ref();
        dst.reserve(payload.len() + 3);
        dst.put_u8(START_BLOCK);
        dst.put_slice(payload);
        dst.put_u8(END_BLOCK);
        dst.put_u8(CARRIAGE_RETURN);
        Ok(())
    }
}

/// Wraps a payload in an MLLP frame (for clients and tests).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 3);
    v.push(START_BLOCK);
    v.extend_from_slice(payload);
    v.push(END_BLOCK);
    v.push(CARRIAGE_RETURN);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_budget_bounds_unfinished_frames_across_connections() {
        let budget = InboundBudget::new(1000);
        let mut a = MllpCodec::new(900).with_budget(budget.clone());
        let mut b = MllpCodec::new(900).with_budget(budget.clone());
        let mut ba = BytesMut::new();
        ba.put_u8(START_BLOCK);
        ba.put_slice(&[b'x'; 600]);
        assert_eq!(a.decode(&mut ba).unwrap(), None);
        assert_eq!(budget.used(), 601);
        let mut bb = BytesMut::new();
        bb.put_u8(START_BLOCK);
        bb.put_slice(b"MSH|^~\\&|A|B|C|D|||ADT^A01|C9|P|2.5\r");
        bb.put_slice(&[b'y'; 500]);
        match b.decode(&mut bb).unwrap() {
            Some(MllpFrame::Overloaded { head, cap }) => {
                assert_eq!(cap, 1000);
                assert!(head.starts_with(b"MSH|"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(budget.used(), 601, "the refused frame holds nothing");
        // the rest of the refused frame is discarded, then b reads normally again
        bb.put_slice(&[b'y'; 10]);
        bb.put_slice(&[
            END_BLOCK,
            CARRIAGE_RETURN,
            START_BLOCK,
            b'o',
            b'k',
            END_BLOCK,
        ]);
        assert_eq!(
            b.decode(&mut bb).unwrap(),
            Some(MllpFrame::Message(Bytes::from_static(b"ok")))
        );
        // a completes: its bytes go back
        ba.put_slice(&[END_BLOCK, CARRIAGE_RETURN]);
        assert!(
            matches!(a.decode(&mut ba).unwrap(), Some(MllpFrame::Message(m)) if m.len() == 600)
        );
        assert_eq!(budget.used(), 0);
        // a dropped connection gives back what it held
        ba.put_u8(START_BLOCK);
        ba.put_slice(&[b'z'; 300]);
        assert_eq!(a.decode(&mut ba).unwrap(), None);
        assert_eq!(budget.used(), 301);
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    fn decode_all(codec: &mut MllpCodec, chunks: &[&[u8]]) -> Vec<MllpFrame> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        out
    }

    fn msg(b: &[u8]) -> MllpFrame {
        MllpFrame::Message(Bytes::copy_from_slice(b))
    }

    #[test]
    fn decodes_back_to_back_frames_and_skips_junk() {
        let mut c = MllpCodec::default();
        let mut input = b"\r\nnoise".to_vec();
        input.extend(frame(b"MSH|a"));
        input.extend(b"\n\n");
        input.extend(frame(b"MSH|b\r\nPID|1"));
        let out = decode_all(&mut c, &[&input]);
        assert_eq!(out, vec![msg(b"MSH|a"), msg(b"MSH|b\r\nPID|1")]);
        assert_eq!(c.junk_bytes(), 7 + 2);
    }

    #[test]
    fn decodes_byte_by_byte() {
        let mut c = MllpCodec::default();
        let mut input = frame(b"\xEF\xBB\xBFMSH|x\rPID|");
        input.extend(frame(b"MSH|y"));
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let out = decode_all(&mut c, &chunks);
        assert_eq!(out, vec![msg(b"\xEF\xBB\xBFMSH|x\rPID|"), msg(b"MSH|y")]);
    }

    #[test]
    fn end_block_without_cr_is_accepted() {
        let mut c = MllpCodec::default();
        let out = decode_all(&mut c, &[b"\x0bMSH|1\x1c\x0bMSH|2\x1c\r"]);
        assert_eq!(out, vec![msg(b"MSH|1"), msg(b"MSH|2")]);
    }

    #[test]
    fn restart_inside_a_frame_abandons_the_fragment() {
        let mut c = MllpCodec::default();
        let out = decode_all(&mut c, &[b"\x0bMSH|broken", b"\x0bMSH|ok\x1c\r"]);
        assert_eq!(out, vec![msg(b"MSH|ok")]);
        assert_eq!(c.abandoned_frames(), 1);
    }

    /// Start blocks without an end block do not restart the read timeout's clock.
    #[test]
    fn a_restarted_frame_keeps_the_first_frames_start_time() {
        let mut c = MllpCodec::default();
        let mut buf = BytesMut::from(&b"\x0bMSH|1"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        let first = c.frame_started().expect("a frame is in progress");
        std::thread::sleep(std::time::Duration::from_millis(5));
        buf.extend_from_slice(b"\x0bMSH|2");
        assert!(c.decode(&mut buf).unwrap().is_none());
        assert_eq!(c.frame_started(), Some(first));
        buf.extend_from_slice(b"\x1c\r");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(msg(b"MSH|2")));
        assert_eq!(c.frame_started(), None);
    }

    #[test]
    fn oversized_frame_is_rejected_and_skipped_without_buffering() {
        let mut c = MllpCodec::new(100);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"\x0bMSH|^~\\&|A|B|C|D|||ADT^A01|CTRL1|P|2.5\r");
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[b'x'; 200]);
        match c.decode(&mut buf).unwrap() {
            Some(MllpFrame::Oversized { head, limit }) => {
                assert_eq!(limit, 100);
                assert!(head.starts_with(b"MSH|^~\\&|A"));
            }
            other => panic!("expected oversized, got {other:?}"),
        }
        // the rest of the big frame streams in and is dropped, never buffered
        for _ in 0..100 {
            buf.extend_from_slice(&[b'y'; 1000]);
            assert!(c.decode(&mut buf).unwrap().is_none());
            assert!(buf.is_empty());
        }
        buf.extend_from_slice(b"tail\x1c\r");
        buf.extend_from_slice(&frame(b"MSH|next"));
        assert_eq!(c.decode(&mut buf).unwrap(), Some(msg(b"MSH|next")));
    }

    #[test]
    fn oversized_head_never_includes_the_next_frame() {
        let mut c = MllpCodec::new(16);
        let mut input = frame(&[b'a'; 20]);
        input.extend(frame(b"MSH|next"));
        let out = decode_all(&mut c, &[&input]);
        match &out[0] {
            MllpFrame::Oversized { head, .. } => assert!(head.iter().all(|b| *b == b'a')),
            other => panic!("{other:?}"),
        }
        assert_eq!(out[1], msg(b"MSH|next"));
    }

    #[test]
    fn frame_exactly_at_the_limit_is_accepted() {
        let mut c = MllpCodec::new(16);
        let payload = [b'a'; 16];
        let out = decode_all(&mut c, &[&frame(&payload)]);
        assert_eq!(out, vec![msg(&payload)]);
        let mut c = MllpCodec::new(16);
        let out = decode_all(&mut c, &[&frame(&[b'a'; 17])]);
        assert!(matches!(out[0], MllpFrame::Oversized { .. }));
    }

    #[test]
    fn encoder_round_trips() {
        let mut c = MllpCodec::default();
        let mut dst = BytesMut::new();
        c.encode(b"MSH|z".as_slice(), &mut dst).unwrap();
        assert_eq!(&dst[..], &frame(b"MSH|z")[..]);
        assert_eq!(c.decode(&mut dst).unwrap(), Some(msg(b"MSH|z")));
    }

    #[test]
    fn eof_inside_a_frame_yields_nothing() {
        let mut c = MllpCodec::default();
        let mut buf = BytesMut::from(&b"\x0bMSH|partial"[..]);
        assert!(c.decode_eof(&mut buf).unwrap().is_none());
    }
}
