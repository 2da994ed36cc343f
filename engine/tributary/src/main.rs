//! `tributary`: the healthcare integration engine's one binary.

mod bench;
mod cli;
mod config;
mod logging;
mod mapping_cli;
mod serve;

use clap::Parser;

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
