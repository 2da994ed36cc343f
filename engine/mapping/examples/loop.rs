//! Throughput aid: parse + map (lineage off) + serialize one file N times on each of THREADS
//! threads (default 1) and print the wall-clock rate.
//! `cargo run --release -p tributary-mapping --example loop -- DIR FILE N [THREADS]`
//!
//! Uses mimalloc, as the `tributary` binary does; build with `--features system-alloc` to
//! measure with the system allocator.

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let set = tributary_mapping::MappingSet::load(std::path::Path::new(&a[1])).unwrap();
    let bytes = std::fs::read(&a[2]).unwrap();
    let n: usize = a[3].parse().unwrap();
    let threads: usize = a.get(4).map_or(1, |t| t.parse().unwrap());
    let opts = tributary_mapping::RunOptions {
        tenant: "default",
        lineage: false,
        feed: None,
    };
    let t = std::time::Instant::now();
    let total: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut total = 0;
                    for _ in 0..n {
                        let m = set
                            .map_bytes(&bytes, tributary_terminology::builtin(), &opts)
                            .unwrap();
                        total += m.to_json().len();
                    }
                    total
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let el = t.elapsed();
    let msgs = n * threads;
    println!(
        "{msgs} on {threads} thread(s) in {el:?}: {:.0} msg/s ({total} bytes)",
        msgs as f64 / el.as_secs_f64()
    );
}
