//! Profiling aid: maps one file N times. `cargo run --release --example loop -- DIR FILE N`
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let set = tributary_mapping::MappingSet::load(std::path::Path::new(&a[1])).unwrap();
    let bytes = std::fs::read(&a[2]).unwrap();
    let n: usize = a[3].parse().unwrap();
    let opts = tributary_mapping::RunOptions {
        tenant: "default",
        lineage: false,
    };
    let t = std::time::Instant::now();
    let mut total = 0;
    for _ in 0..n {
        let m = set
            .map_bytes(&bytes, tributary_terminology::builtin(), &opts)
            .unwrap();
        total += serde_json::to_vec(&m.bundle).unwrap().len();
    }
    let el = t.elapsed();
    println!(
        "{n} in {el:?}: {:.0} msg/s ({total} bytes)",
        n as f64 / el.as_secs_f64()
    );
}
