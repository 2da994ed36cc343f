use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Log lines carry ids, types and outcomes only: no component
/// logs a payload, and `Envelope`'s `Debug` omits its bytes.
pub fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_from_env("TRIBUTARY_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
