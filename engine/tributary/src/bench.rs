//! `tributary bench …`: load generators whose output goes into docs/PERFORMANCE.md.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tributary_core::{Envelope, Protocol};
use tributary_storage::{Db, DbOptions, FjallJournal, Journal};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Durable journal appends at several concurrency levels, beside the disk's raw write+fsync rate.
    #[command(
        after_help = "Example:\n  tributary bench journal --writers 1,16,64,256 --seconds 5 --dir /var/tmp/tributary-bench"
    )]
    Journal(JournalBench),
    /// Drive an MLLP listener: N connections send M messages (sample files with fresh MSH-10s),
    /// one at a time per connection; reports ACKed msgs/s and ACK latency p50/p99/max.
    #[command(
        after_help = "Examples:\n  tributary bench mllp --connections 32 --messages 100000 --file adt.hl7 --file oru.hl7\n  tributary bench mllp --addr 127.0.0.1:2575 --connections 8 --messages 20000 --rate 5000 --file adt.hl7"
    )]
    Mllp(MllpBenchArgs),
}

#[derive(Args, Debug)]
pub struct JournalBench {
    /// Comma-separated concurrent writer counts.
    #[arg(long, default_value = "1,16,64,256", value_delimiter = ',')]
    writers: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload bytes per envelope.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Directory on the disk to measure (a fresh sub-directory per run is created and removed).
    #[arg(long, default_value = "./tributary-bench")]
    dir: PathBuf,
    /// Seconds of the raw write+fsync baseline (0 skips it, for profiling the journal alone).
    #[arg(long, default_value_t = 3)]
    baseline_seconds: u64,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Journal(args) => journal(args),
        BenchCommand::Mllp(args) => mllp(args),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// The baseline: one thread writing `size` bytes and fsyncing, as a naive store-before-ACK would.
fn raw_fsync_rate(
    dir: &std::path::Path,
    size: usize,
    seconds: u64,
) -> anyhow::Result<(f64, Duration)> {
    let path = dir.join("raw-fsync.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let buf = vec![0x42u8; size];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut lat = Vec::new();
    let start = Instant::now();
    while Instant::now() < deadline {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_all()?;
        lat.push(t.elapsed());
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    std::fs::remove_file(&path)?;
    Ok((rate, percentile(&lat, 0.5)))
}

struct RunResult {
    writers: usize,
    appends: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    per_fsync: f64,
}

fn journal_run(
    dir: &std::path::Path,
    writers: usize,
    size: usize,
    seconds: u64,
) -> anyhow::Result<RunResult> {
    let run_dir = dir.join(format!("run-{writers}"));
    let _ = std::fs::remove_dir_all(&run_dir);
    let db = Db::open(&run_dir, DbOptions::default())?;
    let journal = Arc::new(FjallJournal::new(db.clone(), 0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (groups0, jobs0) = (
        db.committer().stats().groups.load(Ordering::Relaxed),
        db.committer().stats().jobs.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    let latencies = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (journal, stop) = (journal.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let payload = bytes::Bytes::from(vec![b'x'; size]);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let env = Envelope::builder(Protocol::Hl7v2, payload.clone())
                        .partner(format!("bench{w}"))
                        .dedup_key(format!("bench{w}/{n}"))
                        .build();
                    let t = Instant::now();
                    journal.append(env).await.expect("append");
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("writer task"));
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    let groups = db.committer().stats().groups.load(Ordering::Relaxed) - groups0;
    let jobs = db.committer().stats().jobs.load(Ordering::Relaxed) - jobs0;
    let mut lat = latencies;
    lat.sort();
    drop(journal);
    drop(db);
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(RunResult {
        writers,
        appends: lat.len(),
        rate: lat.len() as f64 / elapsed,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        per_fsync: jobs as f64 / groups.max(1) as f64,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn journal(args: JournalBench) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let (raw_rate, raw_p50) = if args.baseline_seconds == 0 {
        (f64::NAN, Duration::ZERO)
    } else {
        raw_fsync_rate(&args.dir, args.size, args.baseline_seconds)?
    };
    println!(
        "baseline: raw write({} B)+fsync, 1 thread: {raw_rate:.0} ops/s, p50 {} ms",
        args.size,
        ms(raw_p50)
    );
    println!();
    println!("| writers | appends | appends/s | × raw fsync | × 1 writer | appends per fsync | p50 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut single = None;
    for &w in &args.writers {
        let r = journal_run(&args.dir, w.max(1), args.size, args.seconds)?;
        let base = *single.get_or_insert(r.rate);
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            r.writers,
            r.appends,
            r.rate,
            r.rate / raw_rate,
            r.rate / base,
            r.per_fsync,
            ms(r.p50),
            ms(r.p99),
            ms(r.max)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct MllpBenchArgs {
    /// Listener address.
    #[arg(long, default_value = "127.0.0.1:2575")]
    pub addr: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Messages in total.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Sample HL7 v2 files (batches are split); repeat the flag for several.
    #[arg(long = "file", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Target rate over all connections (msgs/s); default: as fast as ACKs come back.
    #[arg(long)]
    pub rate: Option<f64>,
    /// CA bundle to verify a TLS listener; enables TLS.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Server name to verify (TLS).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Open a new connection for every message (for servers that close after each reply).
    #[arg(long)]
    pub reconnect: bool,
    /// Spread the messages over N synthetic patients (PID-3.1 = BENCH<n>) so ordering keys vary
    /// as in a real feed; default: the samples' own patient ids.
    #[arg(long)]
    pub patients: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn mllp(args: MllpBenchArgs) -> anyhow::Result<ExitCode> {
    let tls = match &args.tls_ca {
        Some(ca) => {
            let client = match (&args.tls_cert, &args.tls_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                _ => None,
            };
            let cfg = tributary_mllp::tls::client_config(Some(ca), client)?;
            Some((Arc::new(cfg), args.server_name.clone()))
        }
        None => None,
    };
    let opts = tributary_mllp::bench::LoadOptions {
        addr: args.addr.clone(),
        connections: args.connections,
        messages: args.messages,
        files: args.files.clone(),
        rate: args.rate,
        tls,
        reconnect: args.reconnect,
        patients: args.patients,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(tributary_mllp::bench::run_load(opts))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(if report.errors == 0 && report.negative == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
