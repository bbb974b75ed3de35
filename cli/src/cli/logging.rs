//! Logging to stderr with `tracing`.

/// Logs to stderr; `STACKWISE_LOG` (or `RUST_LOG`) sets the filter, default `info`.
pub fn init_logging() {
    let filter = std::env::var("STACKWISE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_target(false)
        .init();
}
