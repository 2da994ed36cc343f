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

/// A panic's message is written only when it is a fixed text: a formatted one (an `expect` on
/// an error, an assertion with values) can quote the message being mapped, and panics reach
/// the log. Where it happened is always written; the pipeline and the committer turn the panic
/// into a failed message or job.
fn phi_safe_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map_or_else(
            || "unknown place".to_string(),
            |l| format!("{}:{}", l.file(), l.line()),
        );
        let what = info
            .payload()
            .downcast_ref::<&'static str>()
            .copied()
            .unwrap_or("(message withheld: it may quote message content)");
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        tracing::error!(thread = name, at = %at, message = what, "panic");
        eprintln!("thread '{name}' panicked at {at}: {what}");
    }));
}

fn main() -> std::process::ExitCode {
    phi_safe_panic_hook();
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
