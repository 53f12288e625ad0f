//! End-to-end harness: real processes on loopback.
//!
//! - [`upstream::ScriptedUpstream`]: an in-process HTTP server that replays recorded provider
//!   responses with controllable chunking, delays, status codes and mid-stream aborts, and
//!   remembers every request it saw.
//! - [`procs::Sidecar`] and [`procs::Envoy`]: the real sidecar binary and the real Envoy
//!   binary with the built filter, each on ephemeral ports, killed on drop.
//! - [`admin::Admin`]: a small client of the sidecar's admin API for seeding and asserting
//!   the ledger.
//! - [`stack::Stack`]: all of the above wired together, the usual starting point of a test.

pub mod admin;
pub mod delay_proxy;
pub mod fixtures;
pub mod procs;
pub mod stack;
pub mod upstream;

use std::net::TcpListener;
use std::path::PathBuf;

/// Root of the repository (the workspace).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A port that was free a moment ago. Envoy and the sidecar are told to bind it; the tiny
/// race with another process is acceptable on a test machine.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A fresh directory under the system temp dir for one test's files.
pub fn scratch_dir(label: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "llm-meter-e2e-{label}-{}-{n}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
