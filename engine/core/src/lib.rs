//! Core types shared by every Tributary crate.
//!
//! An adapter turns bytes from a partner into an [`Envelope`] and hands it to the journal; the
//! journal tracks each message through the [`MessageState`] machine. Nothing here does I/O.

mod envelope;
pub mod fhir_primitive;
pub mod fhir_r4;
mod ids;
mod json_cover;
mod search_text;
mod state;
mod time_util;

pub use envelope::{Envelope, EnvelopeBuilder, Protocol};
pub use ids::{
    content_dedup_key, deterministic_id, hl7v2_dedup_key, hl7v2_ordering_key, valid_fhir_id,
    valid_fhir_type, MessageId, PartnerId, TenantId,
};
pub use json_cover::covers;
pub use search_text::{fold_search_string, matches_token, system_is};
pub use state::{MessageState, StateError, StateKind};
pub use time_util::{format_rfc3339_millis, now_millis, parse_rfc3339_millis};
