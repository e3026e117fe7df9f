//! Logs: human-readable by default, JSON with `LOG_FORMAT=json`, filtered by
//! `RUST_LOG` (default `info`). Nothing logged carries a token or a message
//! body: request logs name the route, never the query string.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(true))
            .try_init(),
    };
    // Already initialised (tests build several applications): keep the first.
    let _ = result;
}
