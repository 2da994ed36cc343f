//! HL7 v2 (ER7 encoding) parsing for Tributary.
//!
//! Bytes come in; MSH-18 decides how they are decoded (ASCII, ISO 8859-x, UTF-8, …) before any
//! text is looked at, because a feed that declares `8859/1` is not UTF-8. The parsed [`Message`]
//! owns the decoded text and records only where segments and fields start and end; repetitions,
//! components and subcomponents are split lazily, and escape sequences are resolved only when a
//! value is read ([`Value::value`]). Errors carry line and column, never message content.
//!
//! Why not the `hl7-parser` crate alone: it parses an already-decoded `&str` into a tree that
//! borrows it, so the charset decision (which needs MSH-18 from the raw bytes) and an owned,
//! cheaply movable message for the pipeline both have to live outside it anyway. What remains is
//! small enough to own here, together with batch splitting and the encoding rules we depend on.
//!
//! [`raw`] reads the MSH on undecoded bytes (what an ACK needs); [`ingress`] derives from it the
//! journal keys and meta every HL7 v2 ingress gives a message, and splits a journaled batch.

mod batch;
mod charset;
mod escape;
pub mod ingress;
mod message;
pub mod raw;

pub use batch::{is_batch, split_batch, Batch, BatchPart, CountMismatch};
pub use charset::Charset;
pub use escape::{escape, unescape};
pub use message::{Delimiters, Header, Level, Message, ParseError, ParseErrorKind, Segment, Value};
