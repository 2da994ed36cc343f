//! `tributary`: the healthcare integration engine's one binary.

mod admin;
mod bench;
mod cli;
mod config;
mod logging;
mod mapping_cli;
mod remote;
mod selection;
mod serve;

use clap::Parser;

/// mimalloc instead of glibc malloc: the commit path and the MLLP/HTTP handlers allocate many
/// short-lived buffers that are freed on another thread, where glibc spent most of its time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
