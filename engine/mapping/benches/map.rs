//! Mapping throughput: parse + map (lineage off, unconsumed report on) + serialize the Bundle,
//! in-process, for ADT^A01 and ORU^R01 corpus samples.
//! Run: cargo bench -p tributary-mapping --bench map
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::PathBuf;
use tributary_mapping::{MappingSet, RunOptions};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bench(c: &mut Criterion) {
    let set = MappingSet::load(&repo().join("mappings/hl7v2")).expect("library loads");
    let term = tributary_terminology::builtin();
    let opts = RunOptions {
        tenant: "default",
        lineage: false,
        feed: None,
    };
    let mut g = c.benchmark_group("map_parse_map_serialize");
    for name in [
        "ms-fhir-converter/ADT-A01-01.hl7",
        "ms-fhir-converter/ADT-A01-02.hl7",
        "ms-fhir-converter/ORU-R01-01.hl7",
        "google-whistle/oru_r01_ex1.hl7",
    ] {
        let path = repo().join("../shared/corpus/hl7v2").join(name);
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!("skipping {name}: ../shared/corpus is absent");
            continue;
        };
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = set.map_bytes(&bytes, term, &opts).unwrap();
                m.to_json()
            })
        });
    }
    // the library's own synthetic fixtures (always present)
    for name in ["ADT_A01.hl7", "ORU_R01.hl7"] {
        let bytes = std::fs::read(repo().join("mappings/hl7v2/messages").join(name)).unwrap();
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("fixture/{name}"), |b| {
            b.iter(|| {
                let m = set.map_bytes(&bytes, term, &opts).unwrap();
                m.to_json()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
