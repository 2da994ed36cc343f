//! HL7 v2 over MLLP for Tributary.
//!
//! - [`codec`]: the MLLP framing codec (bounded, tolerant of junk between frames);
//! - [`header`]: reading the MSH (and splitting batches) on raw bytes, enough to acknowledge;
//! - [`ack`]: original/enhanced-mode ACKs, ERR segments, batch ACKs;
//! - [`app_ack`]: enhanced-mode application ACKs (MSH-16) after mapping, and their delivery;
//! - [`source`]: the listener (store-before-ACK, partners, rate limits, timeouts);
//! - [`tls`]: rustls server/client setup with certificate reload;
//! - [`partners`]: partner identification and rate limiting;
//! - [`sink`]: the outbound MLLP client (persistent connection, wait for ACK, retry, TLS);
//! - [`route`]: routing v2 → v2, the registered sink forwarding journaled messages downstream;
//! - [`bench`]: the load generator behind `tributary bench mllp`.

pub mod ack;
pub mod app_ack;
pub mod bench;
pub mod codec;
pub mod config;
pub mod header;
pub mod partners;
pub mod route;
pub mod sink;
pub mod source;
pub use tributary_runtime::tls;

pub use config::{
    AckAfter, BatchCountMismatch, MllpClientTlsConfig, MllpConfig, MllpListenerConfig,
    MllpRouteConfig, MllpTlsConfig, PartnerConfig,
};
pub use route::MllpRoute;
pub use source::{
    ApplicationAck, ApplicationOutcome, JournalStateAck, ListenerContext, MllpError, MllpListener,
    MllpSource,
};
