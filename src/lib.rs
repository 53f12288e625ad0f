//! LLM metering filter for Envoy (proxy-wasm).
//!
//! Everything except `host` is pure logic with no proxy-wasm host calls, unit-tested natively:
//! - `config`: plugin configuration, validated at configure time.
//! - `format`: which provider wire format a route speaks.
//! - `request`: request body parsing (model, stream, output cap), prompt estimate, usage injection.
//! - `sse`: incremental Server-Sent Events parser with bounded memory.
//! - `usage`: per-provider usage extraction from SSE events and JSON bodies.
//! - `strip`: removal of the usage chunk the filter asked for, from what the client sees.
//! - `estimate`: token estimation when a provider reports no usage.
//! - `meter`: one response's metering (feeds bytes, reports usage at any point).
//! - `errors`: error bodies in each provider's own shape.
//! - `lease`: quota leases, so most calls are admitted without asking the sidecar.
//! - `outbox`: settlements waiting to be delivered, with batching, retry and backoff.
//! - `lifecycle`: the per-request state machine's decisions.
//! - `host`: the thin layer that talks to the proxy-wasm host (wasm32 only).

pub mod config;
pub mod errors;
pub mod estimate;
pub mod format;
pub mod lease;
pub mod lifecycle;
pub mod meter;
pub mod outbox;
pub mod request;
pub mod sse;
pub mod strip;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(test)]
mod fuzz_tests;
