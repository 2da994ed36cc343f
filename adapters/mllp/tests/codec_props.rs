//! Property test of the MLLP codec over random inputs (seeded, bounded): frames separated by
//! random junk and delivered in random chunk sizes decode to exactly the payloads sent; arbitrary
//! bytes never panic and never make the decoder buffer more than the frame limit.

use bytes::BytesMut;
use rand::{Rng, SeedableRng};
use tokio_util::codec::Decoder;
use tributary_mllp::codec::{frame, MllpCodec, MllpFrame};

fn payload(rng: &mut impl Rng, max: usize) -> Vec<u8> {
    let len = rng.random_range(0..max);
    (0..len)
        .map(|_| loop {
            let b: u8 = rng.random();
            if b != 0x0b && b != 0x1c {
                break b;
            }
        })
        .collect()
}

#[test]
fn frames_round_trip_through_junk_and_arbitrary_chunking() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4d4c4c50);
    for _ in 0..500 {
        let mut stream = Vec::new();
        let mut sent = Vec::new();
        for _ in 0..rng.random_range(1..8) {
            // junk without a start block between frames
            stream.extend(payload(&mut rng, 20));
            let p = payload(&mut rng, 300);
            stream.extend(frame(&p));
            sent.push(p);
        }
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len().min(64));
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                match f {
                    MllpFrame::Message(m) => got.push(m.to_vec()),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(got, sent);
    }
}

#[test]
fn arbitrary_bytes_never_panic_or_overbuffer() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2000 {
        let len = rng.random_range(0..4096);
        let data: Vec<u8> = (0..len)
            .map(|_| match rng.random_range(0..10) {
                0 => 0x0b,
                1 => 0x1c,
                2 => 0x0d,
                _ => rng.random(),
            })
            .collect();
        let mut codec = MllpCodec::new(128);
        let mut buf = BytesMut::new();
        for chunk in data.chunks(rng.random_range(1..512)) {
            buf.extend_from_slice(chunk);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                match f {
                    MllpFrame::Message(m) => {
                        assert!(m.len() <= 128);
                        let _ = tributary_mllp::header::Header::read(&m);
                        let _ = tributary_mllp::header::split_batch(&m);
                        let _ = tributary_hl7v2::Message::parse(&m);
                    }
                    MllpFrame::Oversized { head, limit } => {
                        assert_eq!(limit, 128);
                        assert!(head.len() <= 130);
                    }
                    MllpFrame::Overloaded { .. } => panic!("no budget was set"),
                }
            }
            assert!(buf.len() <= 130, "buffered {}", buf.len());
        }
    }
}
