//! End-to-end event latency: HL7 v2 message in over MLLP → mapped → committed → relayed → event
//! consumed from the Kafka topic. One Tansu broker and one `tributary serve` (release build, the
//! repository's mapping set, the Kafka sink on), a consumer group on the source-event topics
//! (`hl7v2.*`), and the MLLP load generator at fixed rates.
//!
//! Latency of an event = the consumer's wall clock when the record arrives − the record's
//! `ce_time` header (the instant the listener received the message, millisecond precision, same
//! machine clock). Only events of messages sent in the measured phase count.
//!
//! ```sh
//! cargo build --release -p tributary
//! cargo run --release -p tributary-e2e --example events_latency -- 1000:20 5000:20
//! ```
//! Arguments are `RATE:SECONDS` pairs (default `1000:20 5000:20`). Environment: `TRIBUTARY_BIN`
//! (default `target/release/tributary`), `KEEP_DATA` (keep the data directory for
//! `tributary journal …`), `CONNECTIONS` (default 16), `PATIENTS` (synthetic patient
//! ids the messages are spread over, default 1000: ordering is per patient, so one patient's
//! messages are mapped one after the other), `SAMPLES` (comma-separated HL7 files; default the
//! corpus ADT^A01 and ORU^R01 samples).

use rdkafka::consumer::{Consumer, StreamConsumer};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tributary_e2e::{free_addr, repo_root};
use tributary_kafka::testing::{headers_of, Tansu};
use tributary_mllp::bench::{run_load, LoadOptions};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Consumes until `expected` events stamped at or after `since_ms` arrived (or `deadline`);
/// returns their latencies in ms, sorted, and how many were seen twice (same `ce_id`).
async fn collect(
    consumer: &StreamConsumer,
    since_ms: i64,
    expected: usize,
    deadline: Instant,
) -> (Vec<i64>, usize) {
    let mut lat = Vec::with_capacity(expected);
    let mut ids = HashSet::with_capacity(expected);
    let mut dup = 0;
    while lat.len() < expected && Instant::now() < deadline {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let arrived = now_ms();
        let mut headers = headers_of(&m);
        let at = headers
            .get("ce_time")
            .and_then(|v| tributary_core::parse_rfc3339_millis(v));
        let id = headers.remove("ce_id");
        let Some(at) = at else { continue };
        if at < since_ms {
            continue;
        }
        if !ids.insert(id.unwrap_or_default()) {
            dup += 1;
            continue;
        }
        lat.push(arrived - at);
    }
    lat.sort_unstable();
    (lat, dup)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let phases: Vec<(f64, u64)> = {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let args = if args.is_empty() {
            vec!["1000:20".to_string(), "5000:20".to_string()]
        } else {
            args
        };
        args.iter()
            .map(|a| {
                let (r, s) = a.split_once(':').unwrap_or((a, "20"));
                Ok((r.parse()?, s.parse()?))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let root = repo_root();
    let bin = std::env::var_os("TRIBUTARY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/tributary"));
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release -p tributary",
        bin.display()
    );
    let samples: Vec<PathBuf> = match std::env::var("SAMPLES") {
        Ok(s) => s.split(',').map(PathBuf::from).collect(),
        Err(_) => ["ADT-A01-01.hl7", "ORU-R01-01.hl7"]
            .iter()
            .map(|f| {
                root.join("../shared/corpus/hl7v2/ms-fhir-converter")
                    .join(f)
            })
            .collect(),
    };
    for s in &samples {
        anyhow::ensure!(s.exists(), "sample {} missing", s.display());
    }
    let connections: usize = std::env::var("CONNECTIONS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(16);

    let patients: usize = std::env::var("PATIENTS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);

    let broker = Tansu::start()?;
    let dir = tempfile::tempdir()?;
    let (http, mllp) = (free_addr(), free_addr());
    let config = dir.path().join("tributary.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[log]\nlevel = \"warn\"\n[http]\nlisten = \"{http}\"\n[mllp]\nlisten = \"{mllp}\"\n[mapping]\ndir = {:?}\n[kafka]\nbrokers = \"{}\"\ntopic_replication = 1\n",
            dir.path().join("data").display().to_string(),
            root.join("mappings").display().to_string(),
            broker.bootstrap()
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("serve.log"))?;
    let mut server = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&config)
        // `serve` reads TRIBUTARY_* variables as configuration and refuses unknown keys.
        .env_remove("TRIBUTARY_BIN")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    let ready = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(mllp).is_err() {
        anyhow::ensure!(Instant::now() < ready, "MLLP listener not up within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let consumer: StreamConsumer = broker
        .consumer_config("events-latency")
        .set("topic.metadata.refresh.interval.ms", "500")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    consumer.subscribe(&["^hl7v2\\..*"])?;

    let load = |rate: f64, messages: usize| LoadOptions {
        addr: mllp.to_string(),
        connections,
        messages,
        files: samples.clone(),
        rate: Some(rate),
        tls: None,
        reconnect: false,
        patients: Some(patients),
    };
    // Warm-up: topics created, consumer group joined, mapping set loaded.
    let warm_from = now_ms();
    let warm = run_load(load(200.0, 400)).await?;
    let (seen, _) = collect(
        &consumer,
        warm_from,
        warm.positive,
        Instant::now() + Duration::from_secs(60),
    )
    .await;
    println!(
        "warm-up: {} messages ACKed, {} events consumed",
        warm.positive,
        seen.len()
    );

    println!("| target msgs/s | sent | ACKed msgs/s | ACK p99 ms | events | p50 ms | p99 ms | max ms | dup ids |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (rate, secs) in phases {
        let messages = (rate * secs as f64) as usize;
        let since = now_ms();
        let (report, (lat, dup)) = tokio::join!(
            run_load(load(rate, messages)),
            collect(
                &consumer,
                since,
                messages,
                Instant::now() + Duration::from_secs(secs + 120)
            )
        );
        let report = report?;
        println!(
            "| {rate:.0} | {} | {:.0} | {:.2} | {} | {} | {} | {} | {dup} |",
            report.sent,
            report.msgs_per_sec,
            report.p99_ms,
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(0)
        );
        if lat.len() < report.positive {
            println!(
                "  missing: {} ACKed messages produced no event within {} s after the run",
                report.positive - lat.len(),
                120
            );
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    // The consumer leaves while the broker is up: closing it after the broker is gone blocks in
    // librdkafka (a run once sat there for minutes; the outage test had the same hang).
    drop(consumer);
    drop(broker);
    if std::env::var_os("KEEP_DATA").is_some() {
        println!("data kept in {}", dir.keep().display());
    }
    Ok(())
}
