//! The thin layer between the pure metering logic and the proxy-wasm host (wasm32 only).
//!
//! - `root`: one per plugin per VM; validates the configuration, owns the settlement outbox
//!   and delivers it to the sidecar on a tick (HTTP calls made by a request's own context
//!   would be lost with it).
//! - `http`: one per request; admission, response metering, and exactly one settlement.
//! - `metrics`: Envoy counters.
//!
//! Envoy requirement: the Wasm `PluginConfig` must set `allow_on_headers_stop_iteration: true`
//! (Envoy >= 1.35). Without it Envoy turns the pause in `on_http_request_headers` into
//! `StopAllIteration`, never hands the body to the filter, and metered requests hang until
//! the stream times out.

mod http;
mod metrics;
mod root;

use proxy_wasm::types::LogLevel;
use std::time::{SystemTime, UNIX_EPOCH};

proxy_wasm::main! {{
    // Info, not Debug: debug lines would be formatted on every request even when Envoy
    // discards them, a measurable cost on the hot path.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(root::MeterRoot::new(context_id)));
}}

/// Unix milliseconds of a host timestamp (0 if the clock is before the epoch).
fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
        .unwrap_or(0)
}
