use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}
