//! CPU profiles with `perf` (when installed and permitted): where the time of a process
//! goes while a load runs, summarised by binary/library and by symbol. V8's JIT code (the
//! wasm module itself) has no symbols for perf; it shows as its own anonymous mappings.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// A `perf record` attached to some processes; stop it with [`Recording::finish`].
pub struct Recording {
    child: Child,
    data: std::path::PathBuf,
    /// A whole-machine recording's process of interest (its command name), whose
    /// functions the summary lists inclusively, from call chains.
    focus: Option<String>,
}

/// Start sampling `pids` (call-graphs off: the summaries are flat).
pub fn start(dir: &Path, label: &str, pids: &[u32]) -> Result<Recording> {
    let data = dir.join(format!("perf-{label}.data"));
    let pid_list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args(["record", "-F", "999", "-q", "-o"])
        .arg(&data)
        .arg("-p")
        .arg(pid_list.join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf record (apt-get install linux-perf)")?;
    Ok(Recording {
        child,
        data,
        focus: None,
    })
}

/// Start sampling the whole machine with call chains when `wanted` and perf can; the
/// summary then also lists the functions of the processes named `focus` (a database
/// server's backends, which come and go with the pool) by the time spent in them.
pub fn start_machine(dir: &Path, label: &str, focus: &str, wanted: bool) -> Option<Recording> {
    if !(wanted && available()) {
        return None;
    }
    let data = dir.join(format!("perf-{label}.data"));
    let child = Command::new("perf")
        .args(["record", "-a", "-g", "-F", "499", "-q", "-o"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Recording {
        child,
        data,
        focus: Some(focus.to_string()),
    })
}

/// Start sampling this process when `wanted` and perf can sample here; None otherwise (a
/// profile is an extra, never a reason for a cell to fail).
pub fn start_own(dir: &Path, label: &str, wanted: bool) -> Option<Recording> {
    (wanted && available())
        .then(|| start(dir, label, &[std::process::id()]).ok())
        .flatten()
}

impl Recording {
    /// Stop sampling and summarise, or say why the profile failed (for the report).
    pub fn summary(self) -> String {
        self.finish()
            .unwrap_or_else(|e| format!("profile failed: {e:#}"))
    }

    /// Stop sampling (SIGINT, so perf writes its file) and summarise.
    pub fn finish(mut self) -> Result<String> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let status = self.child.wait()?;
        if !self.data.is_file() {
            bail!("perf record wrote nothing ({status})");
        }
        // Call chains (whole-machine recordings) are summarised flat here.
        let by_binary = report(&self.data, &["--sort", "comm,dso", "-g", "none"], 1.5)?;
        let summary = match &self.focus {
            None => {
                let by_symbol = report(&self.data, &["--sort", "comm,dso,sym"], 1.0)?;
                format!("By process and binary:\n{by_binary}\nTop symbols:\n{by_symbol}")
            }
            Some(comm) => {
                let args = [
                    "--children",
                    "--sort",
                    "sym",
                    "-g",
                    "none",
                    "--comm",
                    comm,
                    "--percentage",
                    "relative",
                ];
                let inclusive = report(&self.data, &args, 3.0)?;
                // Its own code: the kernel's part (loopback TCP, wake-ups, fdatasync) is in
                // the lines above, and the entry points hold every sample.
                let entry = ["main", "PostmasterMain", "__libc_start_call_main"];
                let own: Vec<&str> = inclusive
                    .lines()
                    .filter(|l| l.contains("[.] "))
                    .filter(|l| {
                        !entry
                            .iter()
                            .any(|e| l.trim_end().ends_with(&format!("] {e}")))
                    })
                    .collect();
                format!(
                    "By process and binary (swapper: idle CPU):\n{by_binary}\n\
                     {comm}'s own functions, by share of its samples spent in them (callees \
                     included):\n{}",
                    own.join("\n")
                )
            }
        };
        let _ = std::fs::remove_file(&self.data);
        Ok(summary)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn report(data: &Path, args: &[&str], percent_limit: f64) -> Result<String> {
    let children = args.contains(&"--children");
    let output = Command::new("perf")
        .args(["report", "--stdio", "-q"])
        .args((!children).then_some("--no-children"))
        .args(args)
        .arg("--percent-limit")
        .arg(percent_limit.to_string())
        .arg("-i")
        .arg(data)
        .output()
        .context("perf report")?;
    if !output.status.success() {
        bail!(
            "perf report failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        // Addresses in a stripped binary say nothing to a reader.
        .filter(|l| !l.contains("[.] 0x"))
        .take(if children { 60 } else { 25 })
        .map(|l| {
            // Long C++ symbols would make the report unreadable.
            let l = l.trim_end();
            if l.chars().count() > 150 {
                format!("{}…", l.chars().take(150).collect::<String>())
            } else {
                l.to_string()
            }
        })
        .collect();
    Ok(lines.join("\n"))
}

/// True when `perf` can sample here.
pub fn available() -> bool {
    Command::new("perf")
        .args(["stat", "-e", "task-clock", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
