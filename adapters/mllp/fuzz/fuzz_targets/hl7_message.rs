//! The HL7 parser entry point (and the listener's MSH reader) on arbitrary bytes: errors are
//! fine, panics are not; every segment and field of a parsed message can be walked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = tributary_hl7v2::Message::parse(data) {
        let _ = m.header();
        for seg in m.segments() {
            for (_, f) in seg.fields() {
                for r in f.repetitions() {
                    for c in r.parts() {
                        let _ = c.value();
                    }
                }
            }
        }
    }
    let _ = tributary_hl7v2::split_batch(data);
    if let Ok(h) = tributary_mllp::header::Header::read(data) {
        let _ = h.require_ackable();
        let _ = tributary_mllp::ack::build_ack(Some(&h), tributary_mllp::ack::AckCode::AE, None);
    }
});
