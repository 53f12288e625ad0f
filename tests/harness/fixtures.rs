//! Where response recordings live: the repo's own hand-written `tests/fixtures/`, and the
//! third-party recorded corpus in `../shared/fixtures` when it exists.

use std::path::PathBuf;

/// The repo's own fixtures.
pub fn own_dir() -> PathBuf {
    crate::repo_root().join("tests").join("fixtures")
}

/// The recorded corpus, if present. Under `CI=true` its absence is a failure.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = crate::repo_root()
        .join("..")
        .join("shared")
        .join("fixtures");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "CI=true but the recorded fixture corpus is missing at {}",
            dir.display()
        );
    }
    eprintln!(
        "note: {} not found; recorded-corpus scenarios skipped",
        dir.display()
    );
    None
}

/// Find a fixture by file name: own fixtures first, then the recorded corpus.
pub fn locate(name: &str) -> Option<PathBuf> {
    if name.contains('/') || name.contains("..") {
        return None;
    }
    let own = own_dir().join(name);
    if own.is_file() {
        return Some(own);
    }
    let shared = crate::repo_root()
        .join("..")
        .join("shared")
        .join("fixtures")
        .join(name);
    shared.is_file().then_some(shared)
}
