//! `make bench`: the measurements behind BENCHMARKS.md.
//!
//! Pure modules (also compiled to wasm32-wasip1):
//! - `stream`: the synthetic provider responses every section uses (the bench upstream
//!   serves them, the core bench parses them), so all figures talk about the same bytes.
//! - `alloc`: a counting global allocator, for memory per in-flight stream.
//! - `core`: the filter's parsing core (SSE + usage extraction) timed in a loop; the same
//!   code runs natively and compiled to wasm32-wasip1 under wasmtime.
//! - `stats`: percentiles.
//!
//! Native only (the `llm-meter-bench` orchestrator):
//! - `procs`, `envoy`, `upstream`: Envoy variants, the sidecar and a fast upstream on loopback.
//! - `wrk` (closed loop) and `openloop` (fixed rate) load generators; `proxy` runs them.
//! - `databases`, `seed`, `ledger_bench`, `growth`: the ledger sections; `floor`: the same
//!   round trips and commits as a PostgreSQL ledger pair, with one-row statements.
//! - `report`: BENCHMARKS.md.

pub mod alloc;
pub mod core;
pub mod stats;
pub mod stream;

#[cfg(not(target_arch = "wasm32"))]
pub mod databases;
#[cfg(not(target_arch = "wasm32"))]
pub mod envoy;
#[cfg(not(target_arch = "wasm32"))]
pub mod floor;
#[cfg(not(target_arch = "wasm32"))]
pub mod growth;
#[cfg(not(target_arch = "wasm32"))]
pub mod ledger_bench;
#[cfg(not(target_arch = "wasm32"))]
pub mod openloop;
#[cfg(not(target_arch = "wasm32"))]
pub mod procs;
#[cfg(not(target_arch = "wasm32"))]
pub mod profile;
#[cfg(not(target_arch = "wasm32"))]
pub mod proxy;
#[cfg(not(target_arch = "wasm32"))]
pub mod report;
#[cfg(not(target_arch = "wasm32"))]
pub mod seed;
#[cfg(not(target_arch = "wasm32"))]
pub mod upstream;
#[cfg(not(target_arch = "wasm32"))]
pub mod wrk;
