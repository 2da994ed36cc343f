//! Reading the MSH on raw bytes (enough to acknowledge) and splitting batches: both are the
//! HL7 v2 crate's, shared with the pipeline (which splits a replayed batch) and the mapping CLI.

pub use tributary_hl7v2::raw::{ascii_lossy, body_start, segments, Delims, Header, HeaderError};
pub use tributary_hl7v2::{is_batch, split_batch, Batch, BatchPart, CountMismatch};
