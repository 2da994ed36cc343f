use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::PathBuf;

fn corpus_sample(name: &str) -> Option<Vec<u8>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/hl7v2/ms-fhir-converter")
        .join(name);
    std::fs::read(p).ok()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hl7v2_parse");
    for name in ["ADT-A01-01.hl7", "ORU-R01-01.hl7"] {
        let Some(bytes) = corpus_sample(name) else {
            eprintln!("skipping {name}: ../shared/corpus is absent");
            continue;
        };
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = tributary_hl7v2::Message::parse(&bytes).unwrap();
                let mut n = 0;
                for s in m.segments() {
                    for (_, f) in s.fields() {
                        n += f.repetitions().count();
                    }
                }
                n
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
