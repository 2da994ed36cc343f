//! MLLP decoding of arbitrary bytes split at an arbitrary point: never panics, never yields a
//! frame larger than the limit, never keeps more than the limit (+ framing) buffered.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use tributary_mllp::codec::{MllpCodec, MllpFrame};

const LIMIT: usize = 256;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut codec = MllpCodec::new(LIMIT);
    let mut buf = BytesMut::new();
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        while let Some(frame) = codec.decode(&mut buf).expect("decoding never fails") {
            match frame {
                MllpFrame::Message(m) => {
                    assert!(m.len() <= LIMIT);
                    assert!(!m.contains(&0x1c) && !m.contains(&0x0b));
                    // whatever the payload, the listener's header path must not panic
                    if let Ok(h) = tributary_mllp::header::Header::read(&m) {
                        let _ = tributary_mllp::ack::build_ack(Some(&h), tributary_mllp::ack::AckCode::AA, None);
                    }
                    let _ = tributary_mllp::header::split_batch(&m);
                }
                MllpFrame::Oversized { head, .. } => {
                    // only bytes of the oversized frame itself
                    assert!(head.len() <= LIMIT + 1);
                    assert!(!head.contains(&0x1c) && !head.contains(&0x0b));
                }
                MllpFrame::Overloaded { .. } => panic!("no budget was set"),
            }
        }
        assert!(buf.len() <= LIMIT + 2, "buffered {} bytes", buf.len());
    }
    let _ = codec.decode_eof(&mut buf);
});
