//! Hot paths of the listener: MLLP frame decoding, MSH reading and ACK building.
//! `cargo bench -p tributary-mllp --bench codec`

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use tokio_util::codec::Decoder;
use tributary_mllp::ack::{build_ack, AckCode};
use tributary_mllp::codec::{frame, MllpCodec};
use tributary_mllp::header::Header;

const ADT: &[u8] = b"MSH|^~\\&|ADTAPP|GENHOSP|TRIB|HIE|20240101120000||ADT^A01^ADT_A01|CTRL0001|P|2.5.1\rEVN|A01|20240101120000\rPID|1||PATID1234^^^GENHOSP^MR||EVERYMAN^ADAM^A||19610615|M||2106-3|2222 HOME STREET^^GREENSBORO^NC^27401-1020|GL|(555) 555-2004|(555)555-2004||S||PATID12345001^2^M10^ADT1^AN^A|444333333|987654^NC\rNK1|1|NUCLEAR^NELDA^W|SPO^SPOUSE||||NK^NEXT OF KIN\rPV1|1|I|2000^2012^01||||004777^ATTEND^AARON^A|||SUR||||ADM|A0|\r";

fn bench(c: &mut Criterion) {
    let mut stream = Vec::new();
    for _ in 0..100 {
        stream.extend(frame(ADT));
    }
    let mut g = c.benchmark_group("mllp");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("decode_100_frames", |b| {
        b.iter(|| {
            let mut codec = MllpCodec::default();
            let mut buf = BytesMut::from(&stream[..]);
            let mut n = 0;
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                black_box(f);
                n += 1;
            }
            assert_eq!(n, 100);
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("read_msh", |b| {
        b.iter(|| black_box(Header::read(black_box(ADT)).unwrap().control_id().len()))
    });
    g.bench_function("read_msh_and_build_ack", |b| {
        b.iter(|| {
            let h = Header::read(black_box(ADT)).unwrap();
            black_box(build_ack(Some(&h), AckCode::AA, None))
        })
    });
    g.bench_function("full_parse_hl7v2", |b| {
        b.iter(|| black_box(tributary_hl7v2::Message::parse(black_box(ADT)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
