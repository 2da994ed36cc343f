use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Drive an MLLP listener: N connections send M messages (sample files with fresh MSH-10s),
    /// one at a time per connection; reports ACKed msgs/s and ACK latency p50/p99/max.
    #[command(
        after_help = "Examples:\n  tributary bench mllp --connections 32 --messages 100000 --file adt.hl7 --file oru.hl7\n  tributary bench mllp --addr 127.0.0.1:2575 --connections 8 --messages 20000 --rate 5000 --file adt.hl7"
    )]
    Mllp(MllpBenchArgs),
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
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Mllp(args) => mllp(args),
    }
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
