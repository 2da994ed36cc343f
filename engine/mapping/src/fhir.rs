//! The FHIR R4 element table the mapping compiler checks targets against. It lives in
//! `tributary-core` because the facade reads it too.

pub use tributary_core::fhir_r4::*;
